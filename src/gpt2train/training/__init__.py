"""Training GPT-2: the loop (`loop.py`) and what it is built from.

`setup.py` builds a run from its config; `step.py` is the hot path; `state.py` holds the run's
saveable state and its checkpoints; `start.py` decides how a run starts (new, resumed or refused);
`monitor.py` and `report.py` watch the losses and say what happens; `optim.py` and `schedule.py`
are the optimizer and its learning rate; `distributed.py` and `parallel.py` spread a run over
processes; `signals.py` turns stop signals into a clean stop.
"""
