"""How close two float32 computations of the same probabilities are on any CPU.

float32 carries about 7 significant digits. Two paths that compute the same probabilities (another batch size or
composition, thread count or SIMD kernel, a float64 reference) agree to a few units of the 6th decimal, and how
many units depends on the machine: a comparison at 1e-6 passed here and missed by 2.2e-6 on another CPU of the
same kind. A real mismatch (preprocessing, weights, TTA views) moves probabilities by 1e-3 and more (the tiny
checkpoint fixture spreads its predictions for that reason), so these bounds still tell right from wrong.
"""

# Probabilities of one model through two float32 paths: torch.testing / numpy keyword arguments.
PROBS = {"atol": 1e-5, "rtol": 1e-4}
# The same, for pytest.approx (absolute only: probabilities are in [0, 1]).
PROBS_ABS = PROBS["atol"]
