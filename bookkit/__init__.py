"""The book's machinery, apart from the science in ``lib``: what runs, checks and publishes the chapters, not what
they compute.

``runner`` executes chapters with papermill under a profile (``profiles``), in the order and with the dependencies
that ``chapters`` reads from ``_toc.yml``, on one or two lanes (``lanes``); each chapter's first cell calls
``parameters.check``, which also sends its warnings to a log file (``chapter_log``). ``suite`` is ``make test``,
``nbval_numbers`` the pytest plugin that compares stored outputs, ``install`` the installer behind ``make setup``,
``site_assets`` the offline site's scripts. It imports ``lib``; nothing in ``lib`` imports it, and no change here
invalidates a cached result.
"""
