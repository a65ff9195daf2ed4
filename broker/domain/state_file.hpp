// The state file of one domain (STATE/domains/<name>.json), written atomically after every
// change: enough to find the QEMU again after a restart (pid + start time + uid), reconnect to
// its QMP listener, and know every device the broker plugged and where.
#pragma once

#include <memory>

#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"

namespace broker {

boost::json::value state_to_json(const Domain& d);
Result<std::shared_ptr<Domain>> domain_from_json(const boost::json::value& v);

}  // namespace broker
