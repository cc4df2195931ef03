"""Train a CSM-family learned image codec (the paper's recipe: Adam 1e-4, MultiStepLR, aux lr 1e-3, clip 1.0).

    python -u train.py -d DATA --cuda --N 128 --lambda 0.0025 --epochs 40 --lr_epoch 35 38 \\
        --save_path CKPT --save --checkpoint PRETRAINED
    torchrun --nproc_per_node=4 train.py -d DATA --cuda ...      # one process per GPU (DDP)
    python train.py -d DATA --save_path CKPT --resume            # continue CKPT/checkpoint_latest.pth.tar
    python train.py -d DATA -m compressai:mbt2018-mean --N 64 --M 96 ...   # a CompressAI architecture, same recipe

DATA holds train/ and val/ (or test/) folders of images (searched recursively), or is a flat folder of training
images given with --val-dataset. Training uses random crops of --patch-size, validation the centre crops.
SAVE_PATH receives checkpoint_latest.pth.tar, checkpoint_best.pth.tar (lowest validation loss) and
checkpoint_epochNNN.pth.tar snapshots, each self-describing (eval.py --checkpoint needs no model flags), and
TensorBoard logs in SAVE_PATH/tb. --checkpoint initialises the weights from a file of the same model; with
--resume it also restores the epoch, step, optimizers, scheduler, best loss and RNG states, so the run continues
exactly as if it had not stopped.
"""

import argparse
import ast
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from layers.scan import BACKENDS, resolve_backend
from models import (CheckpointError, build_model, compressai_architectures, compressai_arguments, is_compressai,
                    list_models, read_checkpoint, save_checkpoint)
from utils.data import DataError, EpochSampler, PatchDataset, ShardSampler, resolve_dataset_folders
from utils.training import (AMP_DTYPES, METRICS, RateDistortionLoss, available_cores, bf16_native,
                            capture_rng_state, configure_optimizers, evaluate, exclude_aux_from_ddp,
                            has_unused_parameters, keep_freed_memory, load_optimizer_state, load_weights,
                            restore_rng_state,
                            seed_everything, step_values, train_step)

log = logging.getLogger("csm.train")

LATEST, BEST = "checkpoint_latest.pth.tar", "checkpoint_best.pth.tar"
METRICS_LOG = "metrics.jsonl"  # one line per validation: epoch, step, seconds of the run so far, lr, metrics
TRAINING_STATE = ("epoch", "step", "optimizer", "aux_optimizer", "lr_scheduler")
VAL_IMAGES = 4  # validation reconstructions shown in TensorBoard
# torch 2.14's oneDNN corrupts the heap in the weight gradient of a strided 1x1 convolution with 3 input channels in
# channels_last (g_a's first skip connection); glibc then aborts the process.
CHANNELS_LAST_CPU = ("--channels-last needs --cuda: on the CPU, torch's backward of g_a's strided 1x1 convolution in "
                     "channels_last corrupts memory (and it is no faster there)")
READ_EVERY = 10  # steps between reads of the step results (each read waits for the device)
LR_GAMMA = 0.1


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row); the message says why."""


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def override(text):
    """argparse type: KEY=VALUE with VALUE a Python literal (16, 0.5, (96, 64), True) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (a preset plus overrides of its config, or a CompressAI architecture)")
    model.add_argument("-m", "--model", default="csm", choices=list_models(), metavar="NAME",
                       help=f"preset: {', '.join(n for n in list_models() if not is_compressai(n))}; or "
                            f"compressai:ARCH, CompressAI's architecture ARCH, one of "
                            f"{', '.join(compressai_architectures())}, with --N/--M as its constructor's N and M "
                            "(default: %(default)s)")
    model.add_argument("--N", type=positive_int, help="half the transforms' width (blocks run at 2N channels); "
                                                       "a CompressAI architecture's N")
    model.add_argument("--M", type=positive_int, help="channels of the latent y (also a CompressAI architecture's)")
    model.add_argument("--Z", type=positive_int, help="channels of the hyper-latent z")
    model.add_argument("--acp", choices=("adaptive", "static", "none"), help="adaptive channel partition mode")
    model.add_argument("--no-ssm-branch", dest="ssm_branch", action="store_const", const=False,
                       help="replace the SSM branch of the SRBs by a CNN branch (the CNN-only ablation)")
    model.add_argument("--scan-directions", type=int, choices=(1, 2, 4), help="directions of the 2-D scan")
    model.add_argument("--context", choices=("ssm", "swin"), help="global branch of the entropy context blocks")
    model.add_argument("--num-slices", type=positive_int, help="slices of the channel-wise autoregression")
    model.add_argument("--fusion", choices=("conv1x1", "residual"), help="fusion of the SRB branches")
    model.add_argument("--override", type=override, nargs="+", default=[], metavar="KEY=VALUE",
                       help="any other CSMConfig field, e.g. --override context_dim=64 'cc_hidden=(96, 64)'")
    model.add_argument("--scan-backend", default="auto", choices=BACKENDS,
                       help="selective-scan implementation (default: %(default)s, the fastest available)")

    data = parser.add_argument_group("data")
    data.add_argument("-d", "--dataset", required=True,
                      help="folder with train/ and val/ (or test/), or a flat folder of training images")
    data.add_argument("--val-dataset", help="validation images (required when --dataset has no train/ folder)")
    data.add_argument("--patch-size", type=positive_int, nargs=2, default=(256, 256), metavar=("H", "W"),
                      help="training crop size, multiples of 64 (default: 256 256)")
    data.add_argument("--batch-size", type=positive_int, default=8, help="per process (default: %(default)s)")
    data.add_argument("--test-batch-size", type=positive_int, default=8,
                      help="validation batch size per process (default: %(default)s)")
    data.add_argument("-n", "--num-workers", type=non_negative_int,
                      help="data loader processes (default: 0 on the CPU, where decoding in the training process "
                           "from the image cache leaves every core to the model; min(8, cores) with --cuda)")
    data.add_argument("--cache-images", type=non_negative_float, default=2.0, metavar="GB",
                      help="keep up to this many GB of decoded training images in memory (8-bit), so that each is "
                           "decoded once per process instead of once per crop; 0 turns it off (default: "
                           "%(default)s)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lambda", dest="lmbda", type=positive_float, default=0.0025,
                       help="rate-distortion trade-off (default: %(default)s; TCM: 0.0025 0.0035 0.0067 0.013 0.025 "
                            "0.05 for MSE)")
    optim.add_argument("--type", default="mse", choices=METRICS,
                       help="distortion: lambda*255^2*MSE + bpp or lambda*(1-MS-SSIM) + bpp (default: %(default)s)")
    optim.add_argument("-e", "--epochs", type=positive_int, default=40, help="default: %(default)s")
    optim.add_argument("-lr", "--learning-rate", type=positive_float, default=1e-4, help="default: %(default)s")
    optim.add_argument("--lr_epoch", "--lr-epoch", dest="lr_epoch", type=positive_int, nargs="+", default=[35, 38],
                       help=f"epochs at which the learning rate is multiplied by {LR_GAMMA} (default: 35 38)")
    optim.add_argument("--aux-learning-rate", type=positive_float, default=1e-3,
                       help="learning rate of the entropy bottleneck's quantiles (default: %(default)s)")
    optim.add_argument("--clip_max_norm", "--clip-max-norm", dest="clip_max_norm", type=float, default=1.0,
                       help="gradient-norm clipping, 0 to disable (default: %(default)s)")
    optim.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the initialisation, crops, data order and noise (default: %(default)s)")
    optim.add_argument("--max-bad-steps", type=positive_int, default=20,
                       help="stop after more than this many non-finite steps in a row (default: %(default)s)")

    speed = parser.add_argument_group("speed (every switch trains the same model: README, 'Training speed')")
    speed.add_argument("--threads", type=positive_int,
                       help="torch's CPU threads per process (default: the cores this process may use, divided "
                            "among the processes of a CPU run)")
    speed.add_argument("--amp", default="auto", choices=("auto", *AMP_DTYPES),
                       help="autocast to bfloat16: convolutions and matrix products in bfloat16, the selective "
                            "scan, the entropy model's likelihoods and the loss in float32; auto: bf16 where the "
                            "hardware computes it natively (CUDA GPUs with bfloat16, CPUs with AVX512-BF16 or "
                            "AMX), none elsewhere (default: %(default)s)")
    speed.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                       help="glibc keeps freed memory for reuse instead of returning it to the kernel, so that a "
                            "step's large tensors are not faulted in again page by page (8-16 %% of a CPU step, "
                            "about 5 %% more peak memory) (default: on)")
    speed.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                       help="torch's fused Adam (one kernel for all parameters; skips a bad step without waiting "
                            "for the device) (default: on)")
    speed.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 for float32 matrix products and convolutions on CUDA GPUs (Ampere and newer) "
                            "(default: on)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="model and batches in channels_last memory format (NHWC convolutions), with --cuda "
                            "(default: off)")

    run = parser.add_argument_group("run length, device, checkpoints and logs")
    run.add_argument("--max-steps", type=positive_int,
                     help="stop after this many steps in all (validates and saves latest)")
    run.add_argument("--time-limit", type=positive_float, metavar="SECONDS",
                     help="stop this process after this many seconds of training (validation included), then "
                          "validate and save latest as --max-steps does: a run that fits a time slot, resumed with "
                          "--resume")
    run.add_argument("--lr-time-milestones", type=positive_float, nargs="+", default=[], metavar="FRACTION",
                     help=f"with --time-limit: multiply the learning rate by {LR_GAMMA} when this fraction of the "
                          "time limit has passed (e.g. 0.8 0.93), in addition to --lr_epoch")
    run.add_argument("--epoch-steps", type=positive_int, help="cap the steps of one epoch (default: a full pass)")
    run.add_argument("--cuda", action="store_true", help="train on the GPU (one per process under torchrun)")
    run.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                     help="write checkpoints (default: on)")
    run.add_argument("--save_path", "--save-path", dest="save_path",
                     help="output folder (default: runs/<model>_<type>_lambda<lambda>)")
    run.add_argument("--checkpoint", help="initialise the weights from this checkpoint (same model and config)")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                     help="also restore the training state (epoch, step, optimizers, scheduler, RNG) of --checkpoint, "
                          "by default SAVE_PATH/" + LATEST + " (default: off)")
    run.add_argument("--val-every", type=positive_int, default=1,
                     help="validate (and refresh the latest and best checkpoints) every this many epochs, and after "
                          "the last (default: %(default)s)")
    run.add_argument("--snapshot-every", type=non_negative_int, default=10,
                     help="keep checkpoint_epochNNN.pth.tar every this many epochs, 0 for none (default: "
                          "%(default)s)")
    run.add_argument("--save-every-steps", type=non_negative_int, default=5000,
                     help="also refresh the latest checkpoint every this many steps, 0 for epoch ends only "
                          "(default: %(default)s)")
    run.add_argument("--log-dir", help="TensorBoard folder (default: SAVE_PATH/tb; none with --no-save)")
    run.add_argument("--log-every", type=positive_int, default=100,
                     help="log a line and TensorBoard scalars every this many steps (default: %(default)s)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="tqdm progress bars (default: when stderr is a terminal)")
    run.add_argument("--debug-dump-rank-params", metavar="DIR",
                     help="testing aid: every process writes its final weights to DIR/rank<R>.pt")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(s % 64 for s in args.patch_size):
        parser.error(f"--patch-size must be multiples of 64 (the model's stride); got {args.patch_size}")
    if args.channels_last and not args.cuda:
        parser.error(CHANNELS_LAST_CPU)
    if args.type == "ms-ssim" and min(args.patch_size) < 161:
        parser.error("--type ms-ssim needs patches of at least 192x192 (MS-SSIM's 5 scales need 161 pixels)")
    if is_compressai(args.model):
        widths = [k for k in ("N", "M") if k in compressai_arguments(args.model)]
        refused = [flag for flag, given in CSM_ONLY_FLAGS.items() if given(args)]
        refused += [f"--{k}" for k in ("N", "M") if getattr(args, k) is not None and k not in widths]
        if refused:
            parser.error(f"{', '.join(refused)}: not an option of {args.model}, which takes "
                         f"{' and '.join('--' + k for k in widths)} only")
    if args.lr_time_milestones and args.time_limit is None:
        parser.error("--lr-time-milestones needs --time-limit (they are fractions of it)")
    if any(f >= 1 for f in args.lr_time_milestones):
        parser.error(f"--lr-time-milestones must be fractions below 1; got {args.lr_time_milestones}")
    if args.save_path is None:
        args.save_path = f"runs/{args.model.replace(':', '-')}_{args.type}_lambda{args.lmbda:g}"
    if args.resume and args.checkpoint is None:
        args.checkpoint = str(Path(args.save_path) / LATEST)
    return parser, args


# Model options of the CSM family only: refused with a CompressAI architecture.
CSM_ONLY_FLAGS = {
    "--Z": lambda a: a.Z is not None,
    "--acp": lambda a: a.acp is not None,
    "--no-ssm-branch": lambda a: a.ssm_branch is not None,
    "--scan-directions": lambda a: a.scan_directions is not None,
    "--context": lambda a: a.context is not None,
    "--num-slices": lambda a: a.num_slices is not None,
    "--fusion": lambda a: a.fusion is not None,
    "--override": lambda a: bool(a.override),
    "--scan-backend": lambda a: a.scan_backend != "auto",
}


def model_overrides(args):
    """CSMConfig overrides given on the command line."""
    named = {"N": args.N, "M": args.M, "Z": args.Z, "acp": args.acp, "ssm_branch": args.ssm_branch,
             "scan_directions": args.scan_directions, "context": args.context, "num_slices": args.num_slices,
             "fusion": args.fusion}
    return {**dict(args.override), **{k: v for k, v in named.items() if v is not None}}


class Session:
    """Process layout: rank, world size, device; ``distributed`` when started by torchrun with several processes."""

    def __init__(self, args, parser):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if args.cuda:
            if not torch.cuda.is_available():
                parser.error("--cuda was given but no CUDA GPU is available (drop --cuda to train on the CPU)")
            if self.local_rank >= torch.cuda.device_count():
                parser.error(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            torch.backends.cudnn.benchmark = True  # fixed patch sizes
            if args.amp == "bf16" and not bf16_native(self.device):
                parser.error("--amp bf16 is not supported by this GPU")
        else:
            self.device = torch.device("cpu")
        apply_speed_settings(args, self.device, self.world_size)
        if self.distributed:
            dist.init_process_group("nccl" if args.cuda else "gloo", init_method="env://")
        self.main = self.rank == 0

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def apply_speed_settings(args, device, world_size=1):
    """Resolve the speed switches' automatic values in ``args`` and apply the process-wide ones: torch's CPU threads
    (set before anything runs: the Winograd convolutions' thread pool keeps its first size), TF32 on CUDA, the
    autocast dtype (``--amp auto``) and the data loader's processes."""
    if args.keep_freed_memory:
        keep_freed_memory()
    threads = args.threads or max(1, available_cores() // world_size)
    torch.set_num_threads(threads)
    args.threads = threads
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.amp == "auto":
        args.amp = "bf16" if bf16_native(device) else "none"
    if args.num_workers is None:
        args.num_workers = 0 if device.type == "cpu" else min(8, available_cores())


class TqdmHandler(logging.StreamHandler):
    """Log lines that do not break tqdm's progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def format_duration(seconds):
    """``1d 02:03:04`` / ``02:03:04``."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def plain_args(args):
    """The command-line arguments as plain types (for the checkpoint)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


class Trainer:
    """The state of one run: model, optimizers, data, counters; ``fit()`` runs the epochs."""

    def __init__(self, args, session, error):
        self.args, self.session = args, session
        self.save_path = Path(args.save_path)
        checkpoint_data = self._read_checkpoint(error) if args.checkpoint else None
        if checkpoint_data is not None and args.resume and checkpoint_data.get("seed") not in (None, args.seed):
            log.warning("using the checkpoint's seed %s instead of --seed %s", checkpoint_data["seed"], args.seed)
            args.seed = int(checkpoint_data["seed"])
        seed_everything(args.seed + session.rank)

        try:
            train_dir, val_dir = resolve_dataset_folders(args.dataset, args.val_dataset)
            self.train_set = PatchDataset(train_dir, args.patch_size, random_crop=True, seed=args.seed,
                                          cache_bytes=int(args.cache_images * 2**30))
            self.val_set = PatchDataset(val_dir, args.patch_size, random_crop=False, role="validation")
        except DataError as exc:
            error(str(exc))
        try:
            self.net = build_model(args.model, scan_backend=args.scan_backend, **model_overrides(args))
        except (TypeError, ValueError) as exc:
            error(f"cannot build model {args.model!r}: {exc}")
        if checkpoint_data is not None:
            try:
                load_weights(self.net, checkpoint_data, f"checkpoint {args.checkpoint}")
            except CheckpointError as exc:
                error(str(exc))
        self.net.to(session.device).train()
        if args.channels_last:
            self.net.to(memory_format=torch.channels_last)

        self.criterion = RateDistortionLoss(args.lmbda, args.type)
        self.optimizer, self.aux_optimizer = configure_optimizers(self.net, args.learning_rate, args.aux_learning_rate,
                                                                  fused=args.fused_adam)
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, args.lr_epoch, gamma=LR_GAMMA)
        self.epoch = self.step = self.step_in_epoch = self.bad_total = 0
        self.seconds_before, self.clock = 0.0, time.perf_counter()  # the run's time: earlier processes' + this one's
        self.validated_step = None
        self.best_loss = math.inf
        self.started = None  # perf_counter() when this process began to train (--time-limit counts from there)
        self.time_decays = 0  # --lr-time-milestones passed in this process
        self.out_of_time = False
        self.shared_time_used = 0.0
        rng_state = None
        if args.resume:
            rng_state = self._restore(checkpoint_data, error)

        self.model = self.net
        if session.distributed:
            exclude_aux_from_ddp(self.net)
            find_unused = has_unused_parameters(self.net, session.device)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[session.local_rank] if args.cuda else None, find_unused_parameters=find_unused
            )
        self.train_sampler = EpochSampler(len(self.train_set), True, args.seed, session.rank, session.world_size)
        loader_options = {"num_workers": args.num_workers, "pin_memory": args.cuda,
                          # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
                          "generator": torch.Generator().manual_seed(args.seed)}
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=args.batch_size, sampler=self.train_sampler, **loader_options
        )
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=args.test_batch_size,
            sampler=ShardSampler(len(self.val_set), session.rank, session.world_size), **loader_options
        )
        self.writer = self._tensorboard() if session.main else None
        self._describe()
        if rng_state is not None:  # last, after everything that draws random numbers during setup
            restore_rng_state(rng_state[session.rank] if len(rng_state) == session.world_size else rng_state[0])

    # --- setup --------------------------------------------------------------------------------------------------
    def _read_checkpoint(self, error):
        try:
            data = read_checkpoint(self.args.checkpoint, map_location="cpu")
        except CheckpointError as exc:
            error(str(exc))
        missing = [k for k in TRAINING_STATE if k not in data]
        self.has_state = not missing
        if self.args.resume and missing:
            error(f"checkpoint {self.args.checkpoint} has no training state ({', '.join(missing)} missing) to resume "
                  "from; use it without --resume to initialise the weights")
        return data

    def _restore(self, data, error):
        """Training state of a checkpoint; returns its per-process RNG states (restored once setup is done)."""
        args = self.args
        try:
            load_optimizer_state(self.optimizer, data["optimizer"])
            load_optimizer_state(self.aux_optimizer, data["aux_optimizer"])
            self.lr_scheduler.load_state_dict(data["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            error(f"checkpoint {args.checkpoint}: optimizer state does not fit this model ({exc})")
        self.epoch, self.step = int(data["epoch"]), int(data["step"])
        self.step_in_epoch = int(data.get("step_in_epoch", 0))
        self.best_loss = float(data.get("best_loss", math.inf))
        self.bad_total = int(data.get("bad_steps_total", 0))
        self.seconds_before = float(data.get("train_seconds", 0.0))
        if sorted(self.lr_scheduler.milestones) != sorted(args.lr_epoch):
            log.warning("--lr_epoch %s replaces the checkpoint's milestones %s", args.lr_epoch,
                        sorted(self.lr_scheduler.milestones))
            self.lr_scheduler.milestones = type(self.lr_scheduler.milestones)(args.lr_epoch)
        stored = data.get("train_args", {})
        for key, flag in (("lmbda", "--lambda"), ("type", "--type"), ("batch_size", "--batch-size"),
                          ("patch_size", "--patch-size")):
            if key in stored and stored[key] != plain_args(args)[key]:
                log.warning("resuming with %s %s; the checkpoint was trained with %s", flag, getattr(args, key),
                            stored[key])
        layout = (data.get("world_size"), data.get("batch_size"))
        if self.step_in_epoch and layout != (self.session.world_size, args.batch_size):
            # The epoch's remaining samples depend on how many each process took per step.
            samples = self.step_in_epoch * data["batch_size"] * data["world_size"]
            self.step_in_epoch = math.ceil(samples / (args.batch_size * self.session.world_size))
            log.warning("world size/batch size changed from %s to %s: the data order of this epoch is approximate",
                        layout, (self.session.world_size, args.batch_size))
        return data.get("rng")

    def _tensorboard(self):
        log_dir = self.args.log_dir or (self.save_path / "tb" if self.args.save else None)
        if log_dir is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(log_dir))

    def _describe(self):
        args, s = self.args, self.session
        params = sum(p.numel() for p in self.net.parameters())
        scan = "none" if is_compressai(args.model) else resolve_backend(s.device, args.scan_backend)
        log.info("model %s (%.2fM parameters), config overrides %s, scan backend %s, amp %s", args.model, params / 1e6,
                 model_overrides(args) or "none", scan, args.amp)
        log.info("data: %d training images in %s, %d validation images in %s, patches %dx%d",
                 len(self.train_set), self.train_set.folder, len(self.val_set), self.val_set.folder, *args.patch_size)
        log.info("device %s, %d process(es), batch %d per process, lambda %g (%s), seed %d", s.device, s.world_size,
                 args.batch_size, args.lmbda, args.type, args.seed)
        if self.step:
            log.info("resuming from %s: epoch %d, step %d (%d into the epoch), best validation loss %.5g",
                     args.checkpoint, self.epoch, self.step, self.step_in_epoch, self.best_loss)
        elif args.checkpoint:
            log.info("weights initialised from %s%s", args.checkpoint,
                     " (it also holds a training state: add --resume to continue that run)" if self.has_state else "")
        if any(m >= args.epochs for m in args.lr_epoch):
            log.warning("--lr_epoch %s: milestones at or after --epochs %d never take effect", args.lr_epoch,
                        args.epochs)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def save(self, names, metrics=None):
        """Write the model and the full training state to each file in ``names`` (rank 0; collective call)."""
        rng = self.session.gather(capture_rng_state())
        if not (self.session.main and self.args.save):
            return
        state = {
            "epoch": self.epoch,  # epochs completed
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "best_loss": self.best_loss,
            "bad_steps_total": self.bad_total,
            "train_seconds": self.elapsed(),
            "rng": rng,
            "seed": self.args.seed,
            "world_size": self.session.world_size,
            "batch_size": self.args.batch_size,
            "train_args": plain_args(self.args),
            "metrics": metrics or {},
        }
        for name in names:
            save_checkpoint(self.save_path / name, self.net, self.args.lmbda, **state)

    # --- the loop -----------------------------------------------------------------------------------------------
    def elapsed(self):
        """Seconds the run has taken so far, over every process that resumed it (setup excluded)."""
        return self.seconds_before + time.perf_counter() - self.clock

    def steps_per_epoch(self):
        full = math.ceil(self.train_sampler.per_rank() / self.args.batch_size)
        return min(full, self.args.epoch_steps or full)

    def time_used(self):
        """The fraction of --time-limit this process has used, None without a limit. Under torchrun every process
        takes the first one's clock, shared every READ_EVERY steps (when all are at the same step)."""
        if self.args.time_limit is None:
            return None
        used = (time.perf_counter() - self.started) / self.args.time_limit
        if not self.session.distributed:
            return used
        if self.step % READ_EVERY == 0:
            value = torch.tensor([used], dtype=torch.float64, device=self.session.device)
            dist.broadcast(value, src=0)
            self.shared_time_used = value.item()
        return self.shared_time_used

    def check_time(self):
        """Apply the --lr-time-milestones passed so far; True when --time-limit is reached."""
        used = self.time_used()
        if used is None:
            return False
        milestones = sorted(self.args.lr_time_milestones)
        while self.time_decays < len(milestones) and used >= milestones[self.time_decays]:
            for group in self.optimizer.param_groups:
                group["lr"] *= LR_GAMMA
            self.time_decays += 1
            log.info("step %d: %.0f %% of --time-limit passed, learning rate now %.3g", self.step,
                     100 * milestones[self.time_decays - 1], self.optimizer.param_groups[0]["lr"])
        self.out_of_time = used >= 1
        return self.out_of_time

    def fit(self):
        args = self.args
        self.clock = self.started = time.perf_counter()
        if self.epoch >= args.epochs:
            log.info("the checkpoint has already completed %d of %d epochs: nothing to do", self.epoch, args.epochs)
        first_step = self.step
        while self.epoch < args.epochs and not self.out_of_time:
            if args.max_steps is not None and self.step >= args.max_steps:
                break
            if not self.train_epoch():
                break  # stopped by --max-steps or --time-limit in the middle of an epoch
            self.end_epoch()
        if self.step > first_step and self.validated_step != self.step:
            # The run ends between validations (--max-steps, --val-every): validate, and keep where it stopped.
            self.validate_and_save()
        if args.max_steps is not None and self.step >= args.max_steps and self.epoch < args.epochs:
            log.info("stopped after %d steps (--max-steps); resume with --resume", self.step)
        elif self.out_of_time and self.epoch < args.epochs:
            log.info("stopped at step %d after %s of training (--time-limit); resume with --resume", self.step,
                     format_duration(time.perf_counter() - self.started))
        if self.writer is not None:
            self.writer.close()
        if args.debug_dump_rank_params:
            folder = Path(args.debug_dump_rank_params)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.net.state_dict(), folder / f"rank{self.session.rank}.pt")

    def train_epoch(self):
        """Run the rest of the current epoch (or until --max-steps); True when the epoch is complete."""
        args = self.args
        total = self.steps_per_epoch()
        todo = total - self.step_in_epoch
        if args.max_steps is not None:
            todo = min(todo, args.max_steps - self.step)
        self.train_set.set_epoch(self.epoch)
        self.train_sampler.set_epoch(self.epoch, skip=self.step_in_epoch * args.batch_size)
        self.net.train()
        progress = args.progress if args.progress is not None else sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch}", dynamic_ncols=True,
                        disable=not (progress and self.session.main))
        self.window, self.pending, self.consecutive_bad = [], [], 0
        started, window_steps = time.perf_counter(), 0
        for x in itertools.islice(self.train_loader, todo):
            x = x.to(self.session.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            result = train_step(self.model, x, self.criterion, self.optimizer, self.aux_optimizer, args.clip_max_norm,
                                args.amp, self.session.distributed)
            self.step += 1
            self.step_in_epoch += 1
            window_steps += 1
            self.bar.update(1)
            self.pending.append((self.step, result, x.shape[0] * self.session.world_size))
            # Results are read (a wait for the device) every READ_EVERY steps, not after every step.
            if len(self.pending) >= READ_EVERY or self.step % args.log_every == 0:
                self.read_results()
            if self.step % args.log_every == 0 and self.window:
                self.log_window(time.perf_counter() - started, window_steps, total)
                self.window, started, window_steps = [], time.perf_counter(), 0
            if args.save_every_steps and self.step % args.save_every_steps == 0 and self.step_in_epoch < total:
                self.read_results()
                self.save([LATEST])
            if self.check_time():
                break
        self.read_results()
        self.bar.close()
        if self.window and self.step % args.log_every:
            self.log_window(time.perf_counter() - started, window_steps, total)
        return self.step_in_epoch >= total

    def read_results(self):
        """Account for the pending steps' results in order: finite ones join the log window, non-finite ones are
        counted and logged, and too many of them in a row stop the run."""
        args = self.args
        for step, result, images in self.pending:
            values = step_values(result)
            if values["finite"]:
                self.consecutive_bad = 0
                self.window.append(values | {"images": images})
                continue
            self.consecutive_bad += 1
            self.bad_total += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, aux %s, grad norm %s): skipped, %d in a row, "
                        "%d in all", step, values["loss"], values["aux_loss"], values["grad_norm"],
                        self.consecutive_bad, self.bad_total)
            if self.writer is not None:
                self.writer.add_scalar("train/bad_steps", self.bad_total, step)
            if self.consecutive_bad > args.max_bad_steps:
                self.bar.close()
                raise TrainingStopped(
                    f"{self.consecutive_bad} non-finite steps in a row (more than --max-bad-steps "
                    f"{args.max_bad_steps}) at step {step}: training diverged; try a lower learning rate, "
                    "--amp none, or resume from an earlier checkpoint"
                )
        self.pending = []
        if self.window:
            self.bar.set_postfix(loss=f"{sum(r['loss'] for r in self.window) / len(self.window):.4f}",
                                 bpp=f"{sum(r['bpp_loss'] for r in self.window) / len(self.window):.3f}")

    def planned_steps(self):
        """Steps of the whole run: --epochs full epochs, or --max-steps if that comes first."""
        planned = self.args.epochs * self.steps_per_epoch()
        return planned if self.args.max_steps is None else min(planned, self.args.max_steps)

    def log_window(self, seconds, steps, total):
        window = self.window
        mean = {k: sum(r[k] for r in window) / len(window) for k in window[0] if k not in ("finite", "images")}
        if self.session.distributed:  # every process ran the same steps: average their measures
            keys = sorted(mean)
            values = torch.tensor([mean[k] for k in keys], dtype=torch.float64, device=self.session.device)
            dist.all_reduce(values)
            mean = dict(zip(keys, (values / self.session.world_size).tolist()))
        seconds = max(seconds, 1e-9)
        mean["images_per_second"] = sum(r["images"] for r in window) / seconds
        mean["steps_per_second"] = steps / seconds
        mean["lr"] = self.optimizer.param_groups[0]["lr"]
        eta = max(self.planned_steps() - self.step, 0) / mean["steps_per_second"]
        if self.args.time_limit is not None:
            eta = min(eta, max(self.args.time_limit - (time.perf_counter() - self.started), 0.0))
        log.info("epoch %d step %d/%d (%d in all): loss %.4f bpp %.4f mse %.3g psnr %.2f aux %.4g lr %.3g | "
                 "%.3g steps/s %.2f img/s, ETA %s (training steps)", self.epoch, self.step_in_epoch, total, self.step,
                 mean["loss"], mean["bpp_loss"], mean["mse_loss"], mean["psnr"], mean["aux_loss"], mean["lr"],
                 mean["steps_per_second"], mean["images_per_second"], format_duration(eta))
        if self.writer is not None:
            for key, value in mean.items():
                self.writer.add_scalar(f"train/{key}", value, self.step)

    def end_epoch(self):
        """Scheduler step; every --val-every epochs (and after the last) validation, a line in SAVE_PATH/metrics.jsonl
        and the best/latest/snapshot checkpoints."""
        self.lr_scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        if self.epoch % self.args.val_every == 0 or self.epoch >= self.args.epochs:
            self.validate_and_save()

    def validate_and_save(self):
        """Validation, a line in SAVE_PATH/metrics.jsonl, the latest and (when best) best checkpoints, a snapshot
        every --snapshot-every epochs."""
        self.validated_step = self.step
        metrics, images = evaluate(self.model, self.val_loader, self.criterion, self.session.device, self.args.amp,
                                   self.session.distributed, keep_images=VAL_IMAGES if self.session.main else 0)
        is_best = metrics["loss"] < self.best_loss
        self.best_loss = min(self.best_loss, metrics["loss"])
        log.info("epoch %d (step %d) validation: %s%s", self.epoch - (self.step_in_epoch == 0), self.step,
                 " ".join(f"{k} {v:.5g}" for k, v in metrics.items()), " (best)" if is_best else "")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, self.epoch)
            for i, (x, x_hat) in enumerate(images):
                self.writer.add_image(f"val/original_vs_reconstruction_{i}", torch.cat([x, x_hat], dim=-1),
                                      self.epoch)
            self.writer.flush()
        if self.session.main and self.args.save:
            record = {"epoch": self.epoch, "step": self.step, "seconds": round(self.elapsed(), 1),
                      "lr": self.optimizer.param_groups[0]["lr"], **metrics}
            self.save_path.mkdir(parents=True, exist_ok=True)
            with open(self.save_path / METRICS_LOG, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        names = [LATEST] + ([BEST] if is_best else [])
        if self.args.snapshot_every and self.epoch % self.args.snapshot_every == 0 and self.step_in_epoch == 0:
            names.append(f"checkpoint_epoch{self.epoch:03d}.pth.tar")
        self.save(names, metrics)


def setup_logging(main_process):
    handler = TqdmHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("csm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if main_process else logging.ERROR)
    return handler


def run(argv=None):
    """Parse ``argv``, train, and return the finished ``Trainer`` (its ``net`` is the trained model)."""
    parser, args = parse_args(argv)
    session = Session(args, parser)
    handler = setup_logging(session.main)

    def error(message):
        """A usage error: one line on stderr from the first process, exit code 2 on every process."""
        if session.main:
            parser.error(message)
        sys.exit(2)

    try:
        trainer = Trainer(args, session, error)
        trainer.fit()
        return trainer
    except TrainingStopped as exc:
        sys.exit(f"train.py: error: {exc}" if session.main else 1)
    finally:
        logging.getLogger("csm").removeHandler(handler)
        session.close()


def main(argv=None):
    run(argv)


if __name__ == "__main__":
    main()
