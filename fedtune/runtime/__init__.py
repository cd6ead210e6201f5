"""The deployment runtime, outside the Flower app: the site daemon (SuperNode, executor), the coordinator's
orchestrator and its control of the SuperLink, the processes they start, and the kits they run from.

None of it ships in the FAB (common/, client/, server/): a site runs its own installed ClientApp, and the
coordinator's ServerApp never needs these modules.
"""
