"""pytest plugin for plugin authors (entry point ``pytest11``): fixtures to register
a plugin for one test and to run a recipe on the tiny model."""
