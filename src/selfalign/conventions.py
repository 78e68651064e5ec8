"""The conventions of selfalign, stated once.

Every module that needs one of these imports it from here instead of restating it.

Time direction
    ``x_t = alpha_t * x0 + sigma_t * eps`` with ``t`` in ``[0, 1]``: **t = 0 is data, t = 1 is
    noise** (the SiT/REPA/SRA convention). The original SiT code uses the opposite direction
    (t = 1 is data); :mod:`selfalign.pipeline.convert` converts its checkpoints. DDPM (DiT) uses
    integer steps ``0 .. T-1`` where larger means noisier, the same direction.

Batch size
    Every ``batch_size`` in a selfalign config is the **global** batch: the number of images
    that contribute to one optimizer step, summed over all processes and accumulation steps.
    ``per_process = global / world_size``; accumulation is derived from a ``micro_batch`` cap.

Latent scaling
    SD-VAE latents are multiplied by :data:`SD_VAE_SCALE` (0.18215) before they reach the
    model, and divided by it before decoding. Latent datasets store the encoder's unscaled
    mean and std; the scale is applied once, at sampling time of the latent.

Layer indices
    Transformer blocks are numbered from 1, as in the SRA paper: "block 8" is the output of the
    eighth block (``blocks[7]``).

Class labels
    ``num_classes`` real classes ``0 .. num_classes-1``; the null (unconditional) class used for
    classifier-free guidance is ``num_classes``. Label dropout happens once per example, in the
    trainer, before any forward pass, so the student and the SRA teacher see the same labels.

Size limits
    Every count, size and seed a user gives (a config key or a command-line flag) is checked
    against the bounds below before anything is allocated, so a typo such as a batch of 10**26
    is one line instead of the kernel killing the process. They are far above any published
    run; no integer setting may exceed 64 bits, so none overflows inside torch or NumPy.
"""

SD_VAE_SCALE = 0.18215
DATA_TIME = 0.0
NOISE_TIME = 1.0
CFG_LABEL_DROPOUT = 0.1

# Size limits (see above).
MAX_SEED = 2 ** 63 - 1            # seeds: 0 .. the largest signed 64-bit integer
MAX_BATCH = 2 ** 20               # images per optimizer step (global), per sampling or evaluation batch
MAX_RESOLUTION = 8192             # image side in pixels
MAX_GRID = 1024                   # model input side (pixels or latent cells)
MAX_CHANNELS = 1024               # model input channels
MAX_CLASSES = 2 ** 20             # class-conditional label count
MAX_STEPS = 100_000               # sampling steps, diffusion timesteps
MAX_SAMPLES = 10 ** 7             # images drawn or evaluated in one command
MAX_WIDTH = 65536                 # hidden width of a regularizer's head or projector
MAX_WORKERS = 1024                # data-loading worker processes
