"""Seeded, documented backdoored fixtures and their clean twins (issue 7).

:mod:`diverify.backdoors.text` plants a Rickrolling-style trigger in a copy of a text encoder,
:mod:`diverify.backdoors.denoiser` a BadDiffusion / TrojDiff-style trigger in the digits denoiser.
Each ``build_*`` function writes a checkpoint directory plus ``fixture.json`` (its seed and measured
behaviour) and is what ``diverify backdoor build`` runs.
"""
