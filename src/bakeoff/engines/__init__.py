"""One engine per framework: build a model with a new head, fit it, predict, time it, save it."""
