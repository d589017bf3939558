"""Built-in environment families; each module registers its classes with `dsv.synth.registry.register`."""
