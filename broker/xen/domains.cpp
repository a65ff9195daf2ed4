#include "broker/xen/domains.hpp"

#include <cerrno>

#include "broker/xen/xc_shim.h"

namespace broker::xen {

Result<std::unique_ptr<XcDomainList>> XcDomainList::open() {
  qb_xc* xc = qb_xc_open();
  if (xc == nullptr) {
    return Error({errno, std::system_category()},
                 "cannot open the Xen control interface (libxenctrl, /dev/xen/privcmd)");
  }
  return std::unique_ptr<XcDomainList>(new XcDomainList(xc));
}

XcDomainList::~XcDomainList() { qb_xc_close(xc_); }

Result<std::vector<DomainInfo>> XcDomainList::list() {
  // Domids run below DOMID_FIRST_RESERVED (0x7ff0); read them in batches.
  constexpr unsigned kBatch = 256;
  std::vector<DomainInfo> out;
  std::vector<qb_xc_domain> batch(kBatch);
  std::uint32_t first = 0;
  for (;;) {
    const int n = qb_xc_list(xc_, first, batch.data(), kBatch);
    if (n < 0) return make_error({errno, std::system_category()}, "listing Xen domains");
    for (int i = 0; i < n; ++i) {
      out.push_back({batch[i].domid, batch[i].dying != 0, batch[i].shutdown != 0});
    }
    if (static_cast<unsigned>(n) < kBatch) return out;
    first = batch[n - 1].domid + 1;
  }
}

std::vector<std::uint32_t> released(const std::vector<std::uint32_t>& tracked,
                                    const std::vector<DomainInfo>& now) {
  std::vector<std::uint32_t> out;
  for (auto domid : tracked) {
    bool alive = false;
    for (const auto& d : now) {
      if (d.domid == domid) alive = !d.dying;
    }
    if (!alive) out.push_back(domid);
  }
  return out;
}

}  // namespace broker::xen
