"""The network and its checkpoints, without Lightning: heads, backbone + head, the checkpoint format."""
