-- sagas_owner cost an index entry for every saga written ahead, all under the same owner, and no
-- hot query needs it: renewals look sagas up by id, and releasing an instance's leases at
-- shutdown scans sagas_unfinished, which holds only the unfinished ones.
DROP INDEX IF EXISTS sagas_owner;
