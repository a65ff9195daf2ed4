// The record of one domain (RUN/domains/<name>.json), written atomically after every change:
// enough to find the QEMU again after a restart (pid + start time + uid), reconnect to its QMP
// listener, know every device the broker plugged and where, and the job it was in. Writing
// records is RecordStore's (broker/domain/record_store.hpp); this file turns them into JSON and back.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"

namespace broker {

boost::json::value state_to_json(const Domain& d);
Result<std::shared_ptr<Domain>> domain_from_json(const boost::json::value& v);

// Every record in `dir`, each read back or with the reason it could not be.
struct LoadedRecord {
  std::string file;
  Result<std::shared_ptr<Domain>> domain;
};
std::vector<LoadedRecord> load_records(const std::string& dir);

}  // namespace broker
