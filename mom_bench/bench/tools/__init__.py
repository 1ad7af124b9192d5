"""One-off GPU measurements behind the tuning notes in results/bench/ (the records of their runs are the
`.md` logs there). Each runs on a GPU host as `python -m mom_bench.bench.tools.<name> [args]`; importing
one runs nothing.

- `profile_layers [mqar] [big] [long] [gdn]`: our layers' fwd+bwd: do_bench time, CPU enqueue, host syncs,
  peak memory, torch.profiler tables by CPU and CUDA time.
- `core_configs [mqar] [big] [long]`: the MoM layer's fwd+bwd time and peak memory under variants of the
  chunk core's launch configuration and workspace constants.
- `conv_tiles`: the short convolution's fwd+bwd time per tile of each of its three kernels.
- `cpu_profile [mqar|big|long]`: where the CPU's time goes when the MoM layer's fwd+bwd is enqueued
  (cProfile), against a linear layer's.
- `ab_layer OLD_DIR [mqar] [big] [long]`: the MoM layer of this tree against another revision's copy
  under OLD_DIR/oldmb, alternating in one process (its docstring says how to make the copy).
- `decode_ab`: the decoding step gathered, stepped and scattered against stepped in place in the pool:
  do_bench, CPU enqueue and CUDA-graph replay.
- `lm_eval_generation [auto|float32]`: lm-eval's greedy generation of a MoM LM with and without the
  CUDA-graph decoder, and how far their tokens agree.
"""
