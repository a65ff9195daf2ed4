// Domain death, as libxl notices it: one watch on @releaseDomain and, on each event (which names
// no domain in Xen 4.17), the domain list read again. A domain that is gone or dying has lost its
// device model's reason to run.
#pragma once

#include <cstdint>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/xen/domains.hpp"
#include "broker/xen/store.hpp"

namespace broker::xen {

inline constexpr const char* kReleaseToken = "qbroker-release";

class ReleaseWatcher {
 public:
  ReleaseWatcher(Store& xs, DomainList& domains) : xs_(xs), domains_(domains) {}

  // Registers the watch. xenstored answers with one event at once, so the first poll() lists the
  // domains even if none was released: a domain that died while no broker watched is found.
  Result<void> start();
  // Readable when an event is queued.
  int fileno() const { return xs_.fileno(); }
  // Takes the queued events; when one of them is @releaseDomain, lists the domains and returns
  // the members of `tracked` that are gone or dying. Empty when no such event was queued.
  Result<std::vector<std::uint32_t>> poll(const std::vector<std::uint32_t>& tracked);

 private:
  Store& xs_;
  DomainList& domains_;
};

}  // namespace broker::xen
