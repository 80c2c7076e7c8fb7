"""Training GPT-2: the loop (`loop.py`) and what it is built from.

`resume.py` decides first which run a call trains (new or resumed, or refused); `setup.py` builds
it; `rundir.py` keeps its run directory for it; `step.py` is the hot path; `checkpoints.py` says
when checkpoints are written and writes them, of the parts `state.py` registers; `monitor.py`
watches the losses; `clock.py` times the steps; `report.py` holds what a run says (its header,
step lines and closing lines); `optim.py` and `schedule.py` are the optimizer and its learning
rate; `distributed.py` and `parallel.py` spread a run over processes; `signals.py` turns stop
signals into a clean stop.
"""
