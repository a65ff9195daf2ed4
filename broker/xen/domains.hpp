// Which Xen domains exist: libxenctrl's domain list, behind an interface so tests supply their
// own (there is no hypervisor on a test machine). @releaseDomain events name no domain in Xen
// 4.17, so each one is answered by listing the domains again, as libxl does.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "broker/core/error.hpp"

struct qb_xc;

namespace broker::xen {

struct DomainInfo {
  std::uint32_t domid = 0;
  bool dying = false;
  bool shutdown = false;
};

class DomainList {
 public:
  virtual ~DomainList() = default;
  virtual Result<std::vector<DomainInfo>> list() = 0;
};

// The hypervisor's list through libxenctrl.
class XcDomainList final : public DomainList {
 public:
  // Fails with one message when there is no hypervisor interface (no /dev/xen/privcmd).
  static Result<std::unique_ptr<XcDomainList>> open();
  ~XcDomainList() override;
  Result<std::vector<DomainInfo>> list() override;

 private:
  explicit XcDomainList(qb_xc* xc) : xc_(xc) {}
  qb_xc* xc_;
};

// The domids of `tracked` that `now` shows gone or dying: their device models are to be killed.
std::vector<std::uint32_t> released(const std::vector<std::uint32_t>& tracked,
                                    const std::vector<DomainInfo>& now);

}  // namespace broker::xen
