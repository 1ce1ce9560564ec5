"""The coordinator side: start or reach the workers, admit requests, run draft/verify rounds.

launch.py starts the workers and hands back a Coordinator (coordinator.py: the API and
admission), which runs each request's rounds (rounds.py) with a Drafter (drafter.py) while
draft_health.py tracks the draft worker and text.py turns token ids into streamed text.
"""
