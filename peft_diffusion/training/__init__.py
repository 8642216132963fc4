"""Shared training code for the scripts in train/: configs, data, losses, evaluation, the DreamBooth trainer."""
