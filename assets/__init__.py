"""Bundled data: example images, the ImageNet class table and the small trained checkpoints."""
