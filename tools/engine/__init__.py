"""The MFA engine on Linux: ccv's shader generator and encode path (pinned sources plus our
patch series) built with clang against a recording metal-cpp stand-in, so that the Metal
source and the dispatches a Mac would run can be checked and executed here (DESIGN
section 10). `python tools/mfa_engine.py` is its command line."""
