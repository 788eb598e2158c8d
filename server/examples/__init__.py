"""Hard examples: escalated inputs the cloud tier kept, with its answer, for retraining
(personal-data-sensitive; see README "Hard examples")."""
