"""Adaptive handcrafted feature losses: the handcrafted features and the method."""
