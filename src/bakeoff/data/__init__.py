"""Image folders: scan and validate, split, decode once into a shared uint8 cache, batch."""
