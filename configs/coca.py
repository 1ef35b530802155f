"""CoCa on the built-in shapes corpus: contrastive + captioning losses.

Run (one CPU, about 5 minutes on 2 cores):

  python -m mmjax.train --config configs/coca.py:size=tiny --workdir runs/coca_tiny

Sharded over 8 forced CPU devices (data=2, fsdp=2, tensor=2):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mmjax.train \
      --config configs/coca.py:size=tiny --workdir runs/coca_tiny_8dev \
      --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

Arguments (after the colon, comma separated): size=tiny|bench|small|base|large,
steps=N (total_steps), batch=N (global batch size), accelerator=cpu|gpu|tpu (numerics,
attention kernel and remat for that family: mmjax/runtime/accelerators.py; cpu is f32).

On a TPU pod (README, "Launching on a TPU pod"): configs/coca.py:size=base,accelerator=tpu.

Expected results (size=tiny, defaults, measured on 2 CPU cores, see BUILD_NOTES.md):
final train loss about 0.23 (contrastive 0.14, caption 0.05); on the 512 held-out
images eval/i2t_r1 about 0.59 and eval/t2i_r1 about 0.59 (chance 0.002; many images
share a caption, so eval/i2t_r1_samecap, which counts any identical caption as a hit,
is about 0.88), eval/i2t_r5 about 0.99, eval/caption_bleu4 about 0.91 and
eval/caption_exact about 0.82.
"""

import ml_collections

from mmjax.runtime.accelerators import model_settings
from mmjax.runtime.config import model_size, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=1500, batch=64, accelerator="cpu")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = arg.batch  # Global, over all processes and devices.
    config.total_steps = arg.steps
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    # Resuming (a checkpoint exists) with a config that differs from WORKDIR/config.json is
    # refused unless this is True (mesh, speed and cadence keys may always change; see
    # mmjax/run_record.py RESUMABLE_KEYS).
    config.allow_config_change = False
    # A workdir (or mmjax.interop.open_clip output) whose newest checkpoint's parameters start this run
    # (fresh optimizer); its model config (and tokenizer) replace model.* (and data.tokenizer).
    config.init_from = ""
    config.train = ml_collections.ConfigDict()
    # Gradient accumulation: the global batch is processed in this many slices (less
    # activation memory, same gradient; each slice still sees the whole batch's negatives).
    config.train.microbatches = 1
    # NaN/Inf loss or gradients: 'halt' stops the run (last good checkpoint kept);
    # 'skip' keeps the old weights for that step, counts it (nan_skipped_steps) and goes on.
    config.train.on_nan = "halt"

    config.model = ml_collections.ConfigDict(model_size(arg.size))
    # The accelerator preset: model.dtype (compute; bfloat16 on accelerators), param_dtype
    # (master weights and optimizer state: float32), attention (auto | xla | cudnn | splash)
    # and remat (none | minimal | dots-saveable | full, for all towers or per tower:
    # vision.remat / text.remat / decoder.remat; '' follows model.remat).
    config.model.update(model_settings(arg.accelerator, arg.size))
    # From the size (mmjax/models/config.py SIZES; all but `bench` scan their layers):
    # model.scan_layers.

    # Mesh: sizes of the data, fsdp and tensor axes inside one slice (TPU) or process
    # (elsewhere); one may be -1 to fill its devices. dcn_data / dcn_fsdp multiply the data
    # and fsdp axes across slices/processes (their product: the number of them, or 1).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    # A preset of mmjax.runtime.sharding.RULE_PRESETS: data_parallel (weights replicated) | fsdp
    # (weights' embed dim over fsdp) | fsdp_tensor (fsdp + heads/mlp/vocab over tensor);
    # or a list of (logical name, mesh axes) pairs. The batch goes over data x fsdp.
    config.sharding_rules = "fsdp_tensor"

    config.loss = ml_collections.ConfigDict()
    config.loss.contrastive = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
    config.loss.contrastive_weight = 1.0
    config.loss.caption_weight = 2.0  # CoCa paper: lambda_cap = 2, lambda_con = 1.
    # auto | full | chunked: the LM head + cross-entropy taken caption_chunk positions at a
    # time, rematerialised, so no [B, T, vocab] logits exist (auto: from a 32k vocabulary).
    config.loss.caption_logits = "auto"
    # Sharded softmax loss: gather (one all-gather, B_local x B_global logits per device) |
    # ring (texts around the device ring, B_local x B_local: memory flat in the device count).
    config.loss.sharded_softmax = "gather"
    config.loss.caption_chunk = 16

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.end_learning_rate_factor = 0.01
    config.optimizer.weight_decay = 0.05
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.optimizer.grad_clip = 1.0
    # Keep the Adam moments in host memory between steps (backends with a pinned_host
    # memory space: TPU, GPU, CPU); saves 2x the parameter bytes of device memory.
    config.optimizer.offload_state = False

    config.data = ml_collections.ConfigDict()
    # Source specs: shapes (built in), csv:PATH, wds:PATTERN, arrayrecord:GLOB. `train` may
    # also be a mixture: [(spec, weight), ...] (a Python literal on the command line).
    config.data.train = "shapes"
    config.data.eval = "shapes"
    config.data.image_key = "filepath"  # csv columns
    config.data.caption_key = "caption"
    config.data.seed = 0  # Fixes the shapes corpus itself; the training order follows `seed`.
    config.data.train_examples = 20000  # shapes only
    config.data.eval_examples = 512  # shapes only
    config.data.tokenizer = ""  # Path to a sentencepiece model; '' trains one into the workdir.
    config.data.tokenizer_type = "sentencepiece"  # or clip_bpe (converted open_clip models)
    config.data.tokenizer_vocab_size = 256
    config.data.tokenizer_captions = 200_000  # captions read to train a missing tokenizer
    # Image preprocessing of encoded images (the shapes images are used as they are).
    config.data.crop_scale = (0.9, 1.0)  # random resized crop, area fraction (train)
    config.data.crop_ratio = (3 / 4, 4 / 3)
    config.data.color_jitter = 0.0  # brightness/contrast/saturation strength (train)
    config.data.max_image_pixels = 100_000_000  # larger images are skipped as bombs
    # Bad samples are skipped and counted; too many stop the run.
    config.data.max_skip_fraction = 0.05
    config.data.min_samples_for_skip_check = 1000
    config.data.workers = 0  # grain worker processes; 0 decodes in the training process
    config.data.num_threads = 2  # read threads per worker
    config.data.prefetch = 4

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 128
    config.eval.caption_examples = 512  # How many eval images get a generated caption.

    # Named evaluators (mmjax/evals/suite.py), metrics as eval/NAME/...; each runs every
    # `every` steps (0: eval_every) and at the end. Add one from the command line with
    # --config.evals.NAME="{'type': 'retrieval', 'data': 'csv:/data/val.csv'}".
    config.evals = ml_collections.ConfigDict()
    # COCO caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L) of greedy captions of data.eval.
    config.evals.captioning = dict(type="captioning", generate={"method": "greedy"})
    # Zero-shot colour classification: class names x prompt templates (prompt ensembling).
    # configs/zeroshot/shapes_shapes.txt + shapes_shape_templates.txt with label="shape" is
    # the harder task (near chance after 800 tiny steps; see BUILD_NOTES.md).
    config.evals.zeroshot = dict(
        type="zeroshot",
        data="shapes",
        label="colour",
        classes="configs/zeroshot/shapes_colours.txt",
        templates="configs/zeroshot/shapes_colour_templates.txt",
    )
    return config
