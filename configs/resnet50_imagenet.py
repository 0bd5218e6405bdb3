"""ResNet-50 on ImageNet (ILSVRC 2012): the standard 90-epoch recipe, streamed with grain.

    python -m resnet_jax.main --config configs/resnet50_imagenet.py --workdir runs/resnet50 \
        --config.data_dir=/data/tensorflow_datasets --config.manual_dir=/data/imagenet

What you need first: ImageNet cannot be downloaded automatically. Register at
https://image-net.org, download ILSVRC2012_img_train.tar (138 GB) and
ILSVRC2012_img_val.tar (6.3 GB) into one folder, and pass it as --config.manual_dir.
The first run has tensorflow-datasets prepare `imagenet2012` from those archives as
array_record files in --config.data_dir (a few hours, about 150 GB; needed once, and
best done by one process before a multi-host run, e.g. with this command on one host
with --config.num_train_steps=1); every later run streams from them. On a Cloud TPU
VM pod slice, data_dir is best a disk or bucket every host reads.

Recipe (Goyal et al. 2017, "Accurate, Large Minibatch SGD", the one most JAX and
PyTorch references use): global batch 1024, SGD momentum 0.9, lr 0.1 x 1024/256 = 0.4
after a 5-epoch linear warmup, cosine decay to 0 over 90 epochs, weight decay 1e-4 (not
on BatchNorm and biases), label smoothing 0.1, the last BatchNorm scale of each residual
branch starting at 0, bfloat16 compute. Training: random-resized crop (8-100% of the
area, aspect 3/4-4/3) to 224 and a horizontal flip; evaluation: the shorter side
resized to 256, the central 224 crop, on the 50,000 validation images.

Expected result: about 76% top-1 on the validation set. Anchors: the Flax ImageNet
example's ResNet-50 reaches 76.54% (100 epochs, bf16, batch 1024), and torchvision's
reference weights (IMAGENET1K_V1, 90 epochs, step schedule) 76.13%. Model: 25,557,032 parameters, 4.1 GMAC per 224x224 image (forward).
Time: 112,590 steps of 1024 images; the Flax example reports 4.4 h on a TPU v3-8 for
100 epochs. A CPU cannot train this.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50"
    config.model.stem = "imagenet"
    config.model.zero_init_residual = True
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    # Streamed: 1.28M images (about 190 GB decoded at 224 px) fit in no device memory.
    config.input = "stream"
    config.augment = "random_resized_crop"
    config.image_size = 224
    config.eval_resize_size = 256
    config.crop_padding = 0
    config.random_flip = True
    config.half_precision = True
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 90.0
    # 0.1 per 256 examples: with another --config.batch_size, scale this too.
    config.learning_rate = 0.1 * config.batch_size / 256
    config.lr_schedule = "cosine"
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.label_smoothing = 0.1
    config.log_every_steps = 100
    config.eval_every_steps = 6255  # Every 5 epochs of 1,251 steps.
    config.checkpoint_every_steps = 1251  # Every epoch.
    return config
