import pickle

from geodnn.errors import DivergenceError


def test_a_divergence_keeps_its_diagnosis_apart_from_its_fix_across_processes():
    error = DivergenceError("layer 3 got non-finite weights; at iteration 7", "raise lam")
    assert str(error) == "layer 3 got non-finite weights; at iteration 7; raise lam"
    back = pickle.loads(pickle.dumps(error))  # as a rank's error reaches the launcher
    assert (back.diagnosis, back.fix, str(back)) == (error.diagnosis, "raise lam", str(error))
    assert str(DivergenceError("diverged on another rank")) == "diverged on another rank"
