"""Differential privacy of a bundle: DP-SGD training (:mod:`.dp_sgd`) and the DP release of
the statistics a DP bundle ships (:mod:`.release`)."""
