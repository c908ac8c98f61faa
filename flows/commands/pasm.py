"""`fermine attack` (the PASM point attack as a Ray stage) and `fermine pasm` (Algorithm 1: the pasm pipeline)."""

from __future__ import annotations

from typing import List, Optional

import typer


def _attack_config(popsize, generations, scale, crossover, probe, patch, early_stop, init, seed, chunk_size,
                   device, splits):
    from tasks.pasm.attack import AttackConfig

    return AttackConfig(popsize=popsize, generations=generations, scale=scale, crossover=crossover, probe=probe,
                        patch=patch, early_stop=early_stop, init=init, seed=seed, chunk_size=chunk_size,
                        device=device, splits=tuple(splits)).validate()


def _splits(values: list[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        return default
    return tuple(s.strip() for v in values for s in v.split(",") if s.strip())


def _attack_stage(local: bool, ray_address: str | None, workers: int | None, on_shard=None):
    """The attack as (teacher, table, out, cfg) -> None: in this process, or on Ray actors (default)."""
    if local:
        from tasks.pasm.attack import attack_table

        def run_local(ckpt, table, out, cfg):
            attack_table(ckpt, table, out, cfg, on_shard=(lambda i, n: on_shard(i, n)) if on_shard else None)

        return run_local
    from workers.attack import run_attack
    from workers.cluster import RayConfig

    def run_ray(ckpt, table, out, cfg):
        run_attack(ckpt, table, out, cfg, ray_cfg=RayConfig(address=ray_address), workers=workers,
                   on_shard=(lambda i, info, rej: on_shard(i, info.rows)) if on_shard else None)

    return run_ray


def register(app: typer.Typer) -> None:
    attack_opts = dict(
        popsize=typer.Option(40, help="Candidates per image (Su et al. used 400)."),
        generations=typer.Option(25, help="Differential-evolution generations after the initial population."),
        scale=typer.Option(0.5, help="Scale factor k of Eq. 3 (DE's F)."),
        crossover=typer.Option(1.0, help="Crossover rate; 1 = the Eq. 3 mutant as is (the paper)."),
        probe=typer.Option("pixel", help="pixel: one pixel, L0 = 1 (the paper); patch: the s x s patch."),
        patch=typer.Option(0.14, help="Patch side for --probe patch: pixels if >= 1, else a fraction of the side."),
        early_stop=typer.Option(None, help="Stop an image once its true-class probability is below this."),
        attack_init=typer.Option("lhs", "--attack-init",
                                 help="lhs | uniform | saliency (seeded by one gradient pass)."),
        chunk_size=typer.Option(0, help="Images per forward pass; 0 = measure the fastest once per worker."),
    )

    @app.command("attack")
    def attack_cmd(
        teacher: str = typer.Argument(..., help="Teacher checkpoint folder (the OUT of `fermine train`)."),
        table: str = typer.Argument(..., help="Image table to attack (its labeled --split rows)."),
        out: str = typer.Argument(..., help="Where to write the positions table (rejects go to OUT/rejects)."),
        popsize: int = attack_opts["popsize"],
        generations: int = attack_opts["generations"],
        scale: float = attack_opts["scale"],
        crossover: float = attack_opts["crossover"],
        probe: str = attack_opts["probe"],
        patch: float = attack_opts["patch"],
        early_stop: Optional[float] = attack_opts["early_stop"],
        attack_init: str = attack_opts["attack_init"],
        chunk_size: int = attack_opts["chunk_size"],
        seed: int = typer.Option(0, help="Seed of the search."),
        split: Optional[List[str]] = typer.Option(None, help="Split(s) attacked (default: train)."),
        device: str = typer.Option("auto", help="auto (CUDA when the worker has a GPU), cpu, cuda."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster (auto or ray://host:10001); "
                                                  "default: a local instance."),
        workers: Optional[int] = typer.Option(None, help="Ray actors (default: one per GPU, else one per 2 CPUs)."),
        local: bool = typer.Option(False, "--local", help="Run in this process instead of on Ray."),
        json_path: Optional[str] = typer.Option(None, "--json", help="Also write the summary JSON here."),
    ) -> None:
        """PASM point attack (Eq. 2-3): the most sensitive (x, y, RGB) of every image; resumes a partial run."""
        import time

        from rich.console import Console
        from rich.table import Table

        from flows.cli import UserError
        from flows.progress import progress_bar
        from storage.artifact import Artifact, is_finished
        from tasks.engine.checkpoint import checkpoint_exists

        if not checkpoint_exists(teacher):
            raise UserError(f"no finished checkpoint at {teacher} (model.json + model.pt); train the teacher first")
        if not is_finished(table):
            raise UserError(f"no finished image table at {table}: check the path, or run the stage that makes it")
        try:
            cfg = _attack_config(popsize, generations, scale, crossover, probe, patch, early_stop, attack_init, seed,
                                 chunk_size, device, _splits(split, ("train",)))
        except ValueError as e:
            raise UserError(str(e)) from e
        src = Artifact(table)
        t0 = time.perf_counter()
        with progress_bar("attack shards", src.num_shards) as bar:
            done = {"rows": 0}

            def on_shard(i: int, rows: int) -> None:
                done["rows"] += rows
                bar.update(0, advance=1, info=f"{done['rows'] / max(time.perf_counter() - t0, 1e-9):.1f} img/s")

            try:
                _attack_stage(local, ray_address, workers, on_shard)(teacher, table, out, cfg)
            except ValueError as e:
                raise UserError(str(e)) from e
        secs = time.perf_counter() - t0
        from tasks.pasm.student import attack_summary

        s = attack_summary(out)
        s.update({"seconds": secs, "images_per_s": done["rows"] / secs if done["rows"] else None,
                  "attacked_now": done["rows"]})
        t = Table(title=f"attack -> {out}", show_header=False)
        t.add_row("images attacked", str(s["rows"]))
        t.add_row("rejected (see OUT/rejects)", str(s.get("rejects", 0)))
        if s["rows"]:
            t.add_row("true-class prob. before", f"{s['mean_clean_prob']:.4f}")
            t.add_row("true-class prob. after (fitness)", f"{s['mean_fitness']:.4f}")
            t.add_row("images whose prob. went down", f"{100 * s['lowered']:.1f}%")
            t.add_row("candidate evaluations / image", f"{s['mean_evals']:.0f}")
        t.add_row("images/s (this run)", "-" if not done["rows"] else f"{s['images_per_s']:.2f}"
                  + ("" if done["rows"] == s["rows"] else f"  ({s['rows'] - done['rows']} reused)"))
        Console().print(t)
        if json_path:
            from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

            atomic_write_bytes(json_path, dumps_json(s).encode())

    @app.command("pasm")
    def pasm_cmd(
        table: str = typer.Argument(..., help="Labeled image table (train split: learning material; test: test)."),
        out: str = typer.Argument(..., help="Run folder: a folder per stage (teacher, attack-rN, erase-rN, "
                                  "student-rN, evaluate-*), results.json/.md, report.html."),
        rounds: int = typer.Option(1, help="Self-mining rounds N (the paper: 1-3)."),
        beta: float = typer.Option(0.1, help="Eq. 4 weight of MSE(student, teacher logits); paper: 0.5, 0.1, 0.01."),
        alpha: float = typer.Option(1.0, help="Eq. 4 weight of the cross-entropy."),
        mask_size: float = typer.Option(0.14, help="Erased region side: pixels if >= 1, else a fraction of the "
                                        "side (the paper: 23..39 px at 224)."),
        fill: str = typer.Option("rgb", help="rgb: the attack's perturbed value (the paper) | random | constant."),
        ablation: Optional[List[str]] = typer.Option(None, help="random: random erasing instead of the attack; "
                                                     "no-teacher: PASM w/o teacher (no MSE term, student from the "
                                                     "teacher's initialisation). Repeatable."),
        compare: Optional[List[str]] = typer.Option(None, help="Table VII's one-round conditions trained beside "
                                                    "the rounds: random_erasing, adversarial_erasing, no_teacher; "
                                                    "no_erasing is the rounds' control (round 1's student on the "
                                                    "original images). Repeatable or comma-separated; 'none' for "
                                                    "none. Default: none."),
        teacher: Optional[str] = typer.Option(None, help="Start from this teacher checkpoint instead of training one."),
        test: Optional[str] = typer.Option(None, help="Another test table, evaluated as test set 'test' besides "
                                           "TABLE's test split."),
        arch: str = typer.Option("small_cnn", help="small_cnn (CPU), resnet18, resnet34, resnet50, vgg16."),
        size: int = typer.Option(64, help="Input side in pixels (224 in the paper)."),
        epochs: int = typer.Option(10, help="Teacher epochs (and student epochs unless --student-epochs)."),
        student_epochs: Optional[int] = typer.Option(None, help="Student epochs per round."),
        student_lr_step: Optional[int] = typer.Option(None, help="The student's lr x0.1 every this many epochs "
                                                      "(default: the teacher's 10); set it below --student-epochs "
                                                      "for a student that anneals like its teacher did."),
        batch_size: int = typer.Option(64, help="Images per SGD step."),
        lr: float = typer.Option(0.01, help="Initial learning rate (x0.1 every 10 epochs)."),
        pretrained: Optional[str] = typer.Option(None, help="Local weights for the first teacher (never downloaded)."),
        student_init: str = typer.Option("teacher", help="teacher: refine the teacher's weights | scratch."),
        student_data: str = typer.Option("erased", help="erased: x' only (Eq. 4) | both: originals + erased."),
        popsize: int = attack_opts["popsize"],
        generations: int = attack_opts["generations"],
        scale: float = attack_opts["scale"],
        probe: str = attack_opts["probe"],
        early_stop: Optional[float] = attack_opts["early_stop"],
        attack_init: str = attack_opts["attack_init"],
        chunk_size: int = attack_opts["chunk_size"],
        seed: int = typer.Option(0, help="Seed of training, attack and erasing."),
        device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda."),
        ray_address: Optional[str] = typer.Option(None, help="Ray cluster for the attack; default: a local instance."),
        workers: int = typer.Option(2, help="Ray attack actors."),
        json_path: Optional[str] = typer.Option(None, "--json", help="Also write the run's summary JSON here."),
    ) -> None:
        """PASM (Algorithm 1): teacher -> (attack -> erase -> student) x N, as the pasm pipeline.

        The same DAG as `fermine run` with `pipeline: pasm` (this command builds that config from its
        options), so a rerun reuses every finished stage, and `fermine status OUT` / the report work.
        """
        from flows.cli import UserError
        from flows.commands.run import build_config, run_pipeline

        ablations = set(_splits(ablation, ()))
        bad = ablations - {"random", "no-teacher"}
        if bad:
            raise UserError(f"unknown --ablation {', '.join(sorted(bad))}; choose random and/or no-teacher")
        conditions = [c for c in _splits(compare, ()) if c != "none"]
        cfg = build_config({
            "name": "pasm", "out": out, "seed": seed, "pipeline": "pasm",
            "labeled": {"format": "table", "root": table},
            "cross": [{"format": "table", "root": test, "name": "test"}] if test else [],
            "teacher_checkpoint": teacher,
            "teacher": {"arch": arch, "input_size": size, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                        "pretrained": pretrained, "device": device},
            "attack": {"popsize": popsize, "generations": generations, "scale": scale, "probe": probe,
                       "patch": mask_size, "early_stop": early_stop, "init": attack_init, "chunk_size": chunk_size,
                       "device": device},
            "pasm": {"rounds": rounds, "alpha": alpha, "beta": beta, "student_epochs": student_epochs,
                     "student_lr_step": student_lr_step, "student_init": student_init,
                     "student_data": student_data, "compare": conditions,
                     "random_erasing": "random" in ablations, "no_teacher": "no-teacher" in ablations,
                     "erase": {"size": mask_size, "fill": fill}},
            "ray": {"address": ray_address, "workers": workers},
        })
        summary = run_pipeline(cfg)
        if json_path:
            from tasks.engine.checkpoint import atomic_write_bytes, dumps_json

            atomic_write_bytes(json_path, dumps_json(summary).encode())
