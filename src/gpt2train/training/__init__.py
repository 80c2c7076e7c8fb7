"""Training GPT-2: the loop (`loop.py`) and what it is built from.

`setup.py` builds a run from its config; `step.py` is the hot path; `checkpoints.py` says when
checkpoints are written and writes them, of the parts `state.py` registers; `start.py` decides how
a run starts (new, resumed or refused); `monitor.py` watches the losses; `clock.py` times the steps;
`report.py` holds what a run says at its start and end; `optim.py` and `schedule.py` are the
optimizer and its learning rate; `distributed.py` and `parallel.py` spread a run over processes;
`signals.py` turns stop signals into a clean stop.
"""
