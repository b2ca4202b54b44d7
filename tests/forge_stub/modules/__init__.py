"""Stand-in for Forge's ``modules`` package: A1111's (tests/a1111_stub/modules) with Forge's changes.

Forge's own versions here (``sd_models``, ``processing``) win; every other module comes from the
A1111 stand-in, as Forge's ``modules`` is A1111 v1.10's with changes.
"""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "a1111_stub", "modules"))
