"""Items to pixels: images decoded and prepared, by DataLoader workers or on the GPU."""
