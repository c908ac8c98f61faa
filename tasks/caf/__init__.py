"""The Contrastive Adversarial Framework for valence/arousal: the method and its metrics."""
