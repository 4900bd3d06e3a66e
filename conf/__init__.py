"""Hydra configs shipped with the package (`pkg://unclip.conf`)."""
