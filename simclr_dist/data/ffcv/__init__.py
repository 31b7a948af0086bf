"""The FFCV backend: ``beton`` (read side and checks), ``convert`` (the writer), ``decode`` (the CPU side: one
decode, two crops), ``loader`` (the two-view loader), ``gpu_augment`` (the rest of the recipe, batched on the
device)."""
