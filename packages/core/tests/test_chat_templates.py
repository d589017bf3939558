"""Templates.from_checkpoint: the official encoder file is read with ast, never executed.

Run: ``pytest packages/core/tests/test_chat_templates.py``.
"""

from __future__ import annotations

from pathlib import Path

from dsv.core.chat import Templates, encode_messages, parse_assistant, render_tools

# A file in the shape of the official ``encoding/encoding_dsv32.py``: module-level string
# constants (one annotated, one built by implicit concatenation) next to code that must never run.
ENCODER_FILE = '''
import sys
TOOLS_SYSTEM_TEMPLATE = """## Tools
CHECKPOINT PROSE {dsml_token} {thinking_start_token}{thinking_end_token}
<functions>
{tool_schemas}
</functions>
"""
bos_token: str = "<｜begin▁of▁sentence｜>"
eos_token: str = "<｜end▁of▁sentence｜>"
thinking_start_token: str = "<think>"
thinking_end_token: str = "</think>"
dsml_token: str = "｜DSML｜"
response_format_template: str = (
    "## Response Format:\\n\\nCHECKPOINT FORMAT PROSE\\n{schema}"
)
user_msg_template: str = "<｜User｜>{content}<｜Assistant｜>"
tool_output_template: str = 12
open(sys.argv[0] + ".ran", "w").write("executed")
raise SystemExit("this file must never be executed")
'''


def test_from_checkpoint_reads_constants_without_executing(tmp_path: Path) -> None:
    (tmp_path / "encoding").mkdir()
    (tmp_path / "encoding" / "encoding_dsv32.py").write_text(ENCODER_FILE, encoding="utf-8")
    t = Templates.from_checkpoint(tmp_path)
    assert t.source.endswith("encoding_dsv32.py")
    assert "CHECKPOINT PROSE" in t.tools_system_template
    assert t.response_format_template == "## Response Format:\n\nCHECKPOINT FORMAT PROSE\n{schema}"
    assert t.tool_output_template == Templates().tool_output_template, (
        "a non-string constant keeps the default"
    )
    assert not list(tmp_path.rglob("*.ran"))

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    prompt = encode_messages(
        [{"role": "user", "content": "u"}], thinking=True, tools=[tool], response_format={"a": 1}, templates=t
    )
    assert prompt == (
        "<｜begin▁of▁sentence｜>\n\n## Tools\nCHECKPOINT PROSE ｜DSML｜ <think></think>\n<functions>\n"
        '{"name": "f", "parameters": {"type": "object"}}\n</functions>\n'
        '\n\n## Response Format:\n\nCHECKPOINT FORMAT PROSE\n{"a": 1}<｜User｜>u<｜Assistant｜><think>'
    )
    assert parse_assistant("r</think>c<｜end▁of▁sentence｜>", thinking=True, templates=t).content == "c"


def test_no_encoder_file_means_dsv_wording(tmp_path: Path) -> None:
    t = Templates.from_checkpoint(tmp_path)
    assert t == Templates() and t.source == "dsv"
    tools = render_tools([{"type": "function", "function": {"name": "f"}}], t)
    assert tools.startswith("## Tools\n\n") and '\n<functions>\n{"name": "f"}\n</functions>\n' in tools


def test_unparsable_encoder_file_falls_back(tmp_path: Path) -> None:
    (tmp_path / "encoding").mkdir()
    (tmp_path / "encoding" / "encoding_dsv32.py").write_text("def (:\n", encoding="utf-8")
    assert Templates.from_checkpoint(tmp_path).tools_system_template == Templates().tools_system_template
