"""Progressive Teacher (Lu et al.): the method, label-noise injection, the filtered-sample report."""
