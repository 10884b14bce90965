"""llama_7b: the GaLore paper's C4 pre-training settings (lr 0.005, scale 0.25, T 500, rank 1024, seq 256, bf16)."""

from configs.base import paper


def get_config():
  c = paper("llama_7b", rank=1024, steps=150000, grad_accum=64, lr=0.005,
            update_proj_gap=500)  # 8 sequences/micro-batch
  # One GPU: bf16 weights and states, the reference's clipping for 7B. See docs/training.md "Llama-7B on one GPU".
  c.train.grad_clip = 1.0
  c.model.remat = True
  # Layers stacked and run by one lax.scan, as in llama7b_24gb.py: XLA compiles one layer, not 32 (this step in 8.7 s
  # instead of 55.8 s on a CPU, bench/results/compile-7b-cpu-configured.json), and GaLore projects each kernel type
  # of all 32 layers in one batched matmul. The optimizer takes the same steps as with unrolled layers.
  c.model.scan_layers = True
  # Not the direct SVD: on a GPU jnp.linalg.svd is cuSOLVER's QR-based gesvd for these sizes, 318-559 ms per llama_1b
  # matrix on an H100 and minutes for the 224 matrices of a 7B refresh, which the first step would run. The randomized
  # range finder took 2.2 s for a whole llama_1b refresh there and keeps >= 0.9999 of the exact basis's energy on real
  # gradients (refresh-cpu-llama_1b.json). The exact subspace stays one override away: refresh="gram" (cuSOLVER syevd,
  # not yet timed on a GPU) or "svd".
  c.optimizer.refresh = "randomized"
  return c
