"""bnorder's study harness: data, the training loop, sweeps over orders × norms × seeds ×
backends, and the report of throughput and convergence.

    python -m bnorder train --model resnet20 --order bn-conv-relu --fused --epochs 5
    python -m bnorder study --preset quick        (what `make run` does)
"""
