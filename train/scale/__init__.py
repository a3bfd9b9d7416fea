"""Training at scale with the commands that train on coco_dev here: streamed image-caption corpora (`corpora`),
one process, one GPU or N processes under `torchrun` (`dist`), and a resumable training loop with mixed
precision (`loop`)."""
