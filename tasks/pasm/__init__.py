"""PASM (Liu et al., point adversarial self-mining): the attack, erasing, Grad-CAM erasing (Table VII), the rounds."""
