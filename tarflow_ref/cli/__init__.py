"""The command line: `python -m tarflow_ref {sample,trace,train,bpd,fid,fid-stats,assignments} ...`
(console script `tarflow-ref`), one module per command:

    sample   noise -> images with the sequential (or GS-Jacobi) sampler, guidance, denoising,
             saved as a PNG grid (and optionally .npy); defaults to the bundled digits model
    trace    one row per image: the noise, the image after each flow block in sampling order,
             the denoised image
    train    the released recipe on the digits or an image folder (training/train.py)
    bpd      bits per dimension of a checkpoint on the digits or an image folder
    fid, fid-stats
             FID of samples or images against a statistics file; a statistics file of real
             images
    assignments release | grade
             student versions of the course assignments; reports and a class table of submissions

Every bad value raises common.CommandError before any work; `main` prints it as one line on
stderr and exits with code 2. `sample`, `fid`, `fid-stats` and `train` also run as several
processes under torchrun (`torchrun --nproc-per-node=N -m tarflow_ref ...`), splitting the work
(torch_backend/distributed.py); the other commands refuse to. Images leave the model in [-1, 1]
(plus the training noise); like the released evaluation, batches holding NaN are redrawn, values
are clipped to [-1, 1] and mapped to [0, 1].
"""
from . import assignments, bpd, fid, sample, trace, train
from .common import CommandError, Parser, drawing_options, model_options, solver_options


def build_parser() -> Parser:
    parser = Parser(prog="tarflow-ref", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    model, drawing, solver = model_options(), drawing_options(), solver_options()
    # the commands that split their work over torchrun's processes
    parallel = {"sample", "fid", "fid-stats", "train"}
    runs = {sample.add(commands, [model, drawing, solver]): sample.run,
            trace.add(commands, [model, drawing]): trace.run,
            train.add(commands, []): train.run,
            bpd.add(commands, [model]): bpd.run,
            **fid.add(commands, [model, drawing, solver]),
            **assignments.add(commands)}
    for command, run in runs.items():
        name = command.prog.split()[-1]
        command.set_defaults(run=run, command_parser=command, parallel=name in parallel)
    return parser


def main(argv=None):
    from ..extras import MissingExtra, missing_extra_message

    args = build_parser().parse_args(argv)
    try:
        with parallel_session(args):
            args.run(args)
    except CommandError as err:
        args.command_parser.error(str(err))
    except ModuleNotFoundError as err:      # an optional package (extras.py): the extra to install, in one line
        message = str(err) if isinstance(err, MissingExtra) else missing_extra_message(err, args.command_parser.prog)
        if message is None:
            raise
        args.command_parser.error(message)


def parallel_session(args):
    """torch_backend/distributed.session for the command's device: under torchrun this process
    joins the others (and a command that cannot split its work refuses); else nothing happens."""
    from ..torch_backend import distributed

    device = getattr(args, "device", "cpu")
    if distributed.launched():
        if not args.parallel:
            raise CommandError(f"{args.command} runs as one process; start it without torchrun")
        try:
            distributed.check_device(device)
        except ValueError as err:
            raise CommandError(str(err)) from None
    return distributed.session(device)
