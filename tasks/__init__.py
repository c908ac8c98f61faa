"""The computations: plain typed functions over artifacts, called by flows, workers and tests.

    engine/     the one training loop every method runs on (loop, Method, Recipe, schedules, resume,
                the checkpoint format)
    pasm/       PASM: point attack, erasing, Grad-CAM erasing (Table VII), rounds, figure
    omni/       omni-supervised: centroids, mining, dataset distillation, figure
    pt/         Progressive Teacher: the method, label-noise injection, filtered-sample report
    caf/        Contrastive Adversarial Framework: the method, valence/arousal metrics
    featloss/   adaptive handcrafted feature losses: the features, the method
    shared:     train (the supervised method: teachers, students, retraining), models, data, align,
                evaluate, predict, export, metrics, figures, plots, device

A change to one method touches its subpackage (and, for PASM and omni, the supervised trainer they
train with); flows/code_version.py gives each stage a code version over exactly the modules it reaches.
"""
