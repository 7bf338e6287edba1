"""TensorFlow DCGAN tutorial training-step baseline.

Reproduces the models and the ``train_step`` of the official TensorFlow DCGAN
tutorial (https://www.tensorflow.org/tutorials/generative/dcgan) so that its
per-step throughput can be compared side by side with ``gan-job bench`` (our
PyTorch training step) on the same machine.

Only deliberate differences from the tutorial:

* the input is one in-memory batch of random float32 images in [-1, 1] of
  shape (B, 28, 28, 1) (a tf constant) instead of a tf.data MNIST pipeline,
  so the timing measures the training step alone;
* ``train_step`` returns ``(gen_loss, disc_loss)`` (the tutorial returns
  nothing) so the timed loop can materialize its results with ``.numpy()``;
* ``LeakyReLU`` gets its slope (0.3, the tutorial's Keras 2 default and the
  Keras 3 default) explicitly.

TensorFlow is NOT a dependency of gan-job; run this from a scratch venv:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu &&
    /tmp/tfvenv/bin/python benchmarks/tf_tutorial_step.py

Flags: --steps N (timed steps, default 30), --warmup N (default 5),
--batch-size B (default 256), --threads T (intra/inter op threads; default:
TensorFlow's own choice). The last line printed is one JSON object.
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf

NOISE_DIM = 100
EXPECTED_G_PARAMS = 2_305_472
EXPECTED_D_PARAMS = 212_865


def _leaky_relu():
    # Keras 3 names the slope `negative_slope`; Keras 2 named it `alpha`.
    try:
        return tf.keras.layers.LeakyReLU(negative_slope=0.3)
    except TypeError:
        return tf.keras.layers.LeakyReLU(alpha=0.3)


def make_generator_model():
    layers = tf.keras.layers
    model = tf.keras.Sequential()
    model.add(layers.Dense(7 * 7 * 256, use_bias=False, input_shape=(100,)))
    model.add(layers.BatchNormalization())
    model.add(_leaky_relu())

    model.add(layers.Reshape((7, 7, 256)))
    assert model.output_shape == (None, 7, 7, 256)

    model.add(layers.Conv2DTranspose(128, (5, 5), strides=(1, 1), padding="same", use_bias=False))
    assert model.output_shape == (None, 7, 7, 128)
    model.add(layers.BatchNormalization())
    model.add(_leaky_relu())

    model.add(layers.Conv2DTranspose(64, (5, 5), strides=(2, 2), padding="same", use_bias=False))
    assert model.output_shape == (None, 14, 14, 64)
    model.add(layers.BatchNormalization())
    model.add(_leaky_relu())

    model.add(layers.Conv2DTranspose(1, (5, 5), strides=(2, 2), padding="same", use_bias=False, activation="tanh"))
    assert model.output_shape == (None, 28, 28, 1)

    return model


def make_discriminator_model():
    layers = tf.keras.layers
    model = tf.keras.Sequential()
    model.add(layers.Conv2D(64, (5, 5), strides=(2, 2), padding="same", input_shape=[28, 28, 1]))
    model.add(_leaky_relu())
    model.add(layers.Dropout(0.3))

    model.add(layers.Conv2D(128, (5, 5), strides=(2, 2), padding="same"))
    model.add(_leaky_relu())
    model.add(layers.Dropout(0.3))

    model.add(layers.Flatten())
    model.add(layers.Dense(1))

    return model


def _trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def make_tutorial_training(batch_size, noise_dim=NOISE_DIM):
    """The tutorial's models, losses, optimizers and `train_step`, as the tutorial writes them.

    Returns (generator, discriminator, train_step); train_step(images) -> (gen_loss, disc_loss).
    """
    BATCH_SIZE = batch_size
    generator = make_generator_model()
    discriminator = make_discriminator_model()
    g_params, d_params = _trainable_count(generator), _trainable_count(discriminator)
    assert g_params == EXPECTED_G_PARAMS, g_params
    assert d_params == EXPECTED_D_PARAMS, d_params

    cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    def discriminator_loss(real_output, fake_output):
        real_loss = cross_entropy(tf.ones_like(real_output), real_output)
        fake_loss = cross_entropy(tf.zeros_like(fake_output), fake_output)
        total_loss = real_loss + fake_loss
        return total_loss

    def generator_loss(fake_output):
        return cross_entropy(tf.ones_like(fake_output), fake_output)

    generator_optimizer = tf.keras.optimizers.Adam(1e-4)
    discriminator_optimizer = tf.keras.optimizers.Adam(1e-4)

    @tf.function
    def train_step(images):
        noise = tf.random.normal([BATCH_SIZE, noise_dim])

        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)

            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)

            gen_loss = generator_loss(fake_output)
            disc_loss = discriminator_loss(real_output, fake_output)

        gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
        gradients_of_discriminator = disc_tape.gradient(disc_loss, discriminator.trainable_variables)

        generator_optimizer.apply_gradients(zip(gradients_of_generator, generator.trainable_variables))
        discriminator_optimizer.apply_gradients(zip(gradients_of_discriminator, discriminator.trainable_variables))
        # Not in the tutorial: returned so that callers can read the losses.
        return gen_loss, disc_loss

    return generator, discriminator, train_step


def add_threads_flag(parser):
    """--threads: TensorFlow's intra- and inter-op thread count (both scripts take it)."""
    parser.add_argument(
        "--threads", type=int, default=None, help="intra- and inter-op threads (default: TensorFlow decides)"
    )


def apply_threads(parser, threads):
    """Validate --threads and set it; must run before the TF runtime starts (before any op runs)."""
    if threads is None:
        return
    if threads < 1:
        parser.error("--threads must be >= 1")
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    add_threads_flag(parser)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    apply_threads(parser, args.threads)

    BATCH_SIZE = args.batch_size
    noise_dim = NOISE_DIM

    generator, discriminator, train_step = make_tutorial_training(BATCH_SIZE, noise_dim)
    print(f"generator trainable params: {_trainable_count(generator):,}")
    print(f"discriminator trainable params: {_trainable_count(discriminator):,}")

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1.0, 1.0, size=(BATCH_SIZE, 28, 28, 1)).astype(np.float32))

    for _ in range(args.warmup):
        gen_loss, disc_loss = train_step(images)
    if args.warmup:
        gen_loss.numpy(), disc_loss.numpy()

    start = time.perf_counter()
    for _ in range(args.steps):
        gen_loss, disc_loss = train_step(images)
    g_final, d_final = float(gen_loss.numpy()), float(disc_loss.numpy())
    elapsed = time.perf_counter() - start

    assert np.isfinite(g_final) and np.isfinite(d_final), (g_final, d_final)
    print(f"final gen_loss={g_final:.4f} disc_loss={d_final:.4f}")

    step_time = elapsed / args.steps
    result = {
        "framework": "tensorflow",
        "tf_version": tf.__version__,
        "batch_size": BATCH_SIZE,
        "steps": args.steps,
        "step_time_ms": round(step_time * 1000.0, 3),
        "images_per_s": round(BATCH_SIZE / step_time, 2),
        "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
