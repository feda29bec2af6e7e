"""`vcc prepare`: turn a dataset on disk (or a generated one) into a workspace dataset."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vcc.commands._common import (
    Format,
    FormatOpt,
    ProgressHook,
    log,
    progress,
    render,
    workspace,
)

MinFramesOpt = Annotated[int, typer.Option("--min-frames", min=1, help="Skip videos shorter than this many frames.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=1, max=32, help="Videos probed at once.")]
RootOpt = Annotated[str, typer.Option("--root", help="Folder holding the videos.", show_default=False)]
SplitOpt = Annotated[int, typer.Option("--split", min=1, max=3, help="Official split 1, 2 or 3.")]
ReplaceOpt = Annotated[bool, typer.Option(
    "--replace", help="Overwrite a dataset of the same --name prepared from another source or with other options "
                      "(refused without it; the same prepare again just refreshes it).")]
PrepNameOpt = Annotated[str | None, typer.Option(
    "--name", help="Name of the dataset in the workspace (default: the dataset's, e.g. ucf101, or the --root folder's name).")]
HoldoutOpt = Annotated[float, typer.Option(
    "--holdout", min=0.0, max=0.9,
    help="Share of each class's training videos (whole groups where the dataset has them) moved to a 'val' "
         "split; training then picks its best epoch there instead of on test.")]


def _run(fn: Any, fmt: Any, /, **kwargs: Any) -> None:
    from vcc.core.data.manifest import PrepareResult
    from vcc.core.report import Report, Table

    with progress() as prog:
        res: PrepareResult = fn(workspace(), progress=ProgressHook(prog), **kwargs)
    for w in res.warnings:
        log(f"warning: {w}")
    doc = res.doc()
    splits = [s for s in ("train", "val", "test") if s in res.counts]
    summary = Table(["dataset", "classes", *splits, "skipped", "folder"], title="Prepared dataset")
    summary.add(res.name, len(res.classes), *(res.counts[s] for s in splits), len(res.skipped), str(res.path))
    tables = [summary]
    notes: list[str] = []
    if res.skipped:
        shown = res.skipped[:20]
        skipped = Table(["path", "reason"], [[s["path"], s["reason"]] for s in shown], title=f"Skipped videos ({len(res.skipped)})")
        tables.append(skipped)
        if len(res.skipped) > len(shown):
            notes.append(f"... and {len(res.skipped) - len(shown)} more (all are listed in {res.path}/dataset.json and by --format json)")
    render(Report(doc, tables, notes), fmt)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        no_args_is_help=True,
        help="Prepare a dataset into the workspace: probe every video, skip bad ones with a reason, write a manifest.",
    )

    @sub.command("ucf101")
    def ucf101(
        root: RootOpt,
        splits: Annotated[str, typer.Option("--splits", help="The official ucfTrainTestlist folder (classInd.txt, trainlist0N.txt, testlist0N.txt).", show_default=False)],
        split: SplitOpt = 1,
        holdout: HoldoutOpt = 0.0,
        name: PrepNameOpt = None,
        replace: ReplaceOpt = False,
        min_frames: MinFramesOpt = 8,
        workers: WorkersOpt = 4,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """UCF101: UCF-101/<Class>/v_<Class>_gXX_cYY.avi with the official split lists (labels in classInd.txt order).

        Examples:

          vcc prepare ucf101 --root UCF-101 --splits ucfTrainTestlist
          vcc prepare ucf101 --root UCF-101 --splits ucfTrainTestlist --split 2
        """
        from vcc.core.data.prepare import prepare_ucf101

        _run(prepare_ucf101, fmt, root=root, splits=splits, split=split, holdout=holdout, name=name, min_frames=min_frames, workers=workers, replace=replace)

    @sub.command("hmdb51")
    def hmdb51(
        root: RootOpt,
        splits: Annotated[str, typer.Option("--splits", help="The testTrainMulti_7030_splits folder (<class>_test_split<N>.txt).", show_default=False)],
        split: SplitOpt = 1,
        holdout: HoldoutOpt = 0.0,
        name: PrepNameOpt = None,
        replace: ReplaceOpt = False,
        min_frames: MinFramesOpt = 8,
        workers: WorkersOpt = 4,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """HMDB51: <class>/<video>.avi with the official 70/30 split lists (1 train, 2 test, 0 unused).

        Examples:

          vcc prepare hmdb51 --root hmdb51 --splits testTrainMulti_7030_splits
          vcc prepare hmdb51 --root hmdb51 --splits testTrainMulti_7030_splits --split 3
        """
        from vcc.core.data.prepare import prepare_hmdb51

        _run(prepare_hmdb51, fmt, root=root, splits=splits, split=split, holdout=holdout, name=name, min_frames=min_frames, workers=workers, replace=replace)

    @sub.command("ucf11")
    def ucf11(
        root: RootOpt,
        fold: Annotated[int | None, typer.Option("--fold", min=1, max=25, help="Leave-one-group-out: test on group K only (1..25). Default: test on groups 21-25.")] = None,
        holdout: HoldoutOpt = 0.0,
        name: PrepNameOpt = None,
        replace: ReplaceOpt = False,
        min_frames: MinFramesOpt = 8,
        workers: WorkersOpt = 4,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """UCF11 (YouTube actions): <class>/v_<short>_<GG>/*.avi, split by group so no group is on both sides.

        Examples:

          vcc prepare ucf11 --root data/action_youtube_naudio
          vcc prepare ucf11 --root data/action_youtube_naudio --fold 7
        """
        from vcc.core.data.prepare import prepare_ucf11

        _run(prepare_ucf11, fmt, root=root, fold=fold, holdout=holdout, name=name, min_frames=min_frames, workers=workers, replace=replace)

    @sub.command("folder")
    def folder(
        root: RootOpt,
        val_ratio: Annotated[float, typer.Option("--test-ratio", "--val-ratio", min=0.0, max=0.95, help="Share of each class's videos put in the test split (--val-ratio is its old name; not for trees already split into train/ and test/; --holdout makes a val split).")] = 0.2,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the per-class split.")] = 0,
        holdout: HoldoutOpt = 0.0,
        name: PrepNameOpt = None,
        replace: ReplaceOpt = False,
        min_frames: MinFramesOpt = 8,
        workers: WorkersOpt = 4,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Any <class>/<video> tree (avi, mp4, mkv, webm, mpg, ...); classes sorted by name.

        A tree already split as train/, test/ (and val/) folders of <class>/ folders keeps its split.

        Examples:

          vcc prepare folder --root my_videos --test-ratio 0.2 --name clips
          vcc prepare folder --root my_split   # my_split/{train,val,test}/<class>/
        """
        from vcc.core.data.prepare import prepare_folder

        _run(prepare_folder, fmt, root=root, val_ratio=val_ratio, seed=seed, holdout=holdout, name=name, min_frames=min_frames, workers=workers, replace=replace)

    @sub.command("synthetic")
    def synthetic(
        classes: Annotated[int, typer.Option("--classes", min=2, max=10, help="Number of motion classes.")] = 8,
        videos_per_class: Annotated[int, typer.Option("--videos-per-class", min=2, help="Videos per class (75% train, 25% test).")] = 96,
        frames: Annotated[int, typer.Option("--frames", min=4, help="Frames per video.")] = 40,
        size: Annotated[int, typer.Option("--size", min=16, help="Frame width and height in pixels (even; the few narrow sizes decord misreads, 16, 24, 48 and 72 on x86-64, are refused).")] = 64,
        seed: Annotated[int, typer.Option("--seed", help="Generator seed (same seed, same videos).")] = 0,
        holdout: HoldoutOpt = 0.0,
        name: PrepNameOpt = None,
        replace: ReplaceOpt = False,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Generate the built-in motion dataset: shapes whose motion (not looks) gives the class.

        Examples:

          vcc prepare synthetic
          vcc prepare synthetic --classes 4 --videos-per-class 16 --name tiny
        """
        from vcc.core.data.synthetic import prepare_synthetic

        _run(prepare_synthetic, fmt, name=name or "synthetic", classes=classes, videos_per_class=videos_per_class, frames=frames, size=size, seed=seed, holdout=holdout, replace=replace)

    app.add_typer(sub, name="prepare", help="Prepare a dataset (ucf101, hmdb51, ucf11, folder, synthetic) into the workspace.")
