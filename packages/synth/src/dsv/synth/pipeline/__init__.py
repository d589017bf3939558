"""dsv.synth.pipeline: LLM-proposed environments, checked in the sandbox, kept in a library.

``build`` runs ``dsv synth build``; ``Library`` stores accepted environments and
serves them through ``SandboxedEnvironment``, whose methods run only in
``dsv.synth.sandbox``. The proposal format is ``PROPOSAL_INSTRUCTIONS``.
"""

from dsv.synth.pipeline.build import BuildConfig, ProposalOutcome, build, check_proposal
from dsv.synth.pipeline.dedup import Fingerprint, find_duplicate, jaccard
from dsv.synth.pipeline.harness import HarnessError, run_harness
from dsv.synth.pipeline.library import Library, LibraryError, SandboxedEnvironment
from dsv.synth.pipeline.proposal import PROPOSAL_INSTRUCTIONS, ProposalFormatError, extract_code, static_check

__all__ = [
    "PROPOSAL_INSTRUCTIONS",
    "BuildConfig",
    "Fingerprint",
    "HarnessError",
    "Library",
    "LibraryError",
    "ProposalFormatError",
    "ProposalOutcome",
    "SandboxedEnvironment",
    "build",
    "check_proposal",
    "extract_code",
    "find_duplicate",
    "jaccard",
    "run_harness",
    "static_check",
]
