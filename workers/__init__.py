"""Worker modules to deploy and to copy: run from the repository's root,
`asyncgrad worker NAME --import workers.MODULE` loads one (importing it exposes its
functions and classes). Each imports its pieces from the installed package; a module of
your own does the same, with `@asyncgrad.rpc.expose` on what other workers may call.
"""
