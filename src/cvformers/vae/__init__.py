"""Image tokenizers behind one face: encode(images)->ids[B,h,w], decode(ids)->images, num_tokens, grid_size."""
