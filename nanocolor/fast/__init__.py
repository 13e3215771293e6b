"""The fast engine: the numbers of the textbook model (nanocolor/layers.py, model.py), sooner.

`Network(model, conv)` (network.py) runs a ColorNet's forward and backward from its layers'
params and buffers, in fewer passes over memory than layer by layer, its caches in its own
records, and `Critic(model, conv)` the GAN's critic; nanocolor/engine.py decides when they are
used. `conv` picks how each 'same' convolution is computed, and only that:

    "gemm"       gemm.py: one GEMM per piece of the batch (or, for few outputs, multiply first
                 and add the k*k shifted products)
    "winograd"   winograd.py: Winograd F(2x2, 3x3) for 3x3 convs on even sizes, else gemm
    "winograd4"  winograd4.py: Winograd F(4x4, 3x3) for 3x3 convs on sizes divisible by 4, else gemm
    "auto"       per conv, what measured fastest for its shape (conv2d_path), and a conv after a
                 x2 upsampling at the low resolution (upsampled_conv_path)

whatever `conv`, convs with a stride or other than 'same' padding (the critic's) run by strided.py.

The modules, simplest first: parallel.py (the CPU workers and the cutting of work into pieces),
workspace.py (scratch buffers, prepared weights), helpers.py (passes and products every
algorithm shares), resample.py (max-pool, upsample, the ReLU's and LeakyReLU's backward),
norm.py (BatchNorm, Upsample + Concat), gemm.py, winograd.py, winograd4.py, upsampled.py,
strided.py (the conv algorithms, one a module), conv.py (which algorithm for which conv),
network.py (the model's blocks put together).
"""
from __future__ import annotations

from . import parallel
from .conv import CONVS, conv2d_backward, conv2d_forward, conv2d_path, upsampled_conv_path
from .network import Critic, Network

__all__ = ["CONVS", "Critic", "Network", "conv2d_backward", "conv2d_forward", "conv2d_path", "parallel", "upsampled_conv_path"]
