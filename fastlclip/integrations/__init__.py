"""fastlclip where RL frameworks consume rewards: ``verl_omni`` (an async client of ``python -m fastlclip.serve``,
loaded as ``path=pkg://fastlclip.integrations.verl_omni``) and ``flow_grpo`` (an in-process scorer). The ReNO
drop-in is ``fastlclip.reno.LatentCLIPLoss``."""
