"""The inspection page (``carnet-inspect``): the model's mistakes, suspected label errors, duplicates and leaks."""
