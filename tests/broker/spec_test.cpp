#include "broker/lifecycle/spec.hpp"

#include <boost/json/parse.hpp>

#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "support/broker_printers.hpp"
#include "support/support.hpp"

using namespace broker::lifecycle;
namespace json = boost::json;

namespace {
std::string field_of(const std::string& body) {
  auto r = parse_domain_spec(json::parse(body));
  REQUIRE_FALSE(r);
  CHECK(r.error().code == errc::invalid_spec);
  return r.error().field;
}
}  // namespace

TEST_CASE("a valid domain body parses into a spec", "[lifecycle]") {
  auto r = parse_domain_spec(json::parse(
      R"({"name":"vm1","memory_mib":256,"vcpus":2,"kernel":"/srv/k","append":"console=ttyS0"})"));
  REQUIRE(r);
  CHECK(r->name == "vm1");
  CHECK(r->memory_mib == 256);
  CHECK(r->vcpus == 2);
  CHECK(r->machine == Machine::q35);
}

TEST_CASE("a domain without a kernel boots through SeaBIOS or UEFI", "[lifecycle]") {
  auto bios = parse_domain_spec(json::parse(R"({"name":"vm","boot_order":["cd0","d0"]})"));
  REQUIRE(bios);
  CHECK(bios->firmware == Firmware::bios);
  CHECK(bios->boot_order == std::vector<std::string>{"cd0", "d0"});
  auto uefi = parse_domain_spec(
      json::parse(R"({"name":"vm","firmware":"uefi","secure_boot":true,"nvram":"/srv/vm.fd"})"));
  REQUIRE(uefi);
  CHECK(uefi->firmware == Firmware::uefi);
  CHECK(uefi->secure_boot);
  CHECK(uefi->nvram == "/srv/vm.fd");
}

TEST_CASE("bad domain bodies are refused naming the field", "[lifecycle]") {
  CHECK(field_of(R"({"memory_mib":128})") == "name");
  CHECK(field_of(R"({"name":"a,b","kernel":"/k"})") == "name");
  CHECK(field_of(R"({"name":"../etc","kernel":"/k"})") == "name");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","memory_mib":8})") == "memory_mib");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","memory_mib":-1})") == "memory_mib");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","memory_mib":"128"})") == "memory_mib");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","vcpus":0})") == "vcpus");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","vcpus":100000})") == "vcpus");
  CHECK(field_of(R"({"name":"vm","firmware":"efi"})") == "firmware");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","firmware":"uefi"})") == "firmware");
  CHECK(field_of(R"({"name":"vm","machine":"none","firmware":"uefi"})") == "firmware");
  CHECK(field_of(R"({"name":"vm","secure_boot":true})") == "secure_boot");
  CHECK(field_of(R"({"name":"vm","firmware":"uefi","secure_boot":"yes"})") == "secure_boot");
  CHECK(field_of(R"({"name":"vm","nvram":"/srv/vars.fd"})") == "nvram");
  CHECK(field_of(R"({"name":"vm","firmware":"uefi","nvram":"vars.fd"})") == "nvram");
  CHECK(field_of(R"({"name":"vm","boot_order":"d0"})") == "boot_order");
  CHECK(field_of(R"({"name":"vm","boot_order":["d0","d0"]})") == "boot_order");
  CHECK(field_of(R"({"name":"vm","boot_order":["a,b"]})") == "boot_order");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","boot_order":["d0"]})") == "boot_order");
  CHECK(field_of(R"({"name":"vm","kernel":"relative/k"})") == "kernel");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","append":"a\u0001b"})") == "append");
  CHECK(field_of(R"({"name":"vm","kernel":"/k","colour":"red"})") == "colour");
  CHECK(field_of(R"({"name":"vm","machine":"pc","kernel":"/k"})") == "machine");
  CHECK(field_of(R"({"name":"vm","machine":"none","kernel":"/k"})") == "kernel");
  CHECK(field_of(R"([1,2])") == "body");
}

TEST_CASE("uid ranges that touch root or real users are refused", "[lifecycle]") {
  qbtest::TempDir dir;
  qbtest::write_file(dir / "passwd",
                     "root:x:0:0::/root:/bin/sh\n"
                     "qemu-base:x:70000:70000::/:/bin/false\n"
                     "alice:x:70005:70005::/home/alice:/bin/sh\n");
  auto parsed = UidRange::parse("70000:4");
  REQUIRE(parsed);
  CHECK(parsed->validate(dir / "passwd"));  // the base may be a real (reaper) user
  auto overlapping = UidRange::parse("70000:16");
  REQUIRE(overlapping);
  auto bad = overlapping->validate(dir / "passwd");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message.find("alice") != std::string::npos);
  CHECK_FALSE(UidRange{0, 10}.validate(dir / "passwd"));
  CHECK_FALSE(UidRange{70000, 1}.validate(dir / "passwd"));
  CHECK_FALSE(UidRange{0xfffffff0U, 100}.validate(dir / "passwd"));
  CHECK_FALSE(UidRange::parse("70000").has_value());
  CHECK_FALSE(UidRange::parse("x:4").has_value());
  CHECK_FALSE(UidRange::parse("70000:4:1").has_value());
}

TEST_CASE("KVM is used only when a domain uid can open the device through its group or the world",
          "[lifecycle]") {
  auto node = [](mode_t mode, gid_t gid) {
    struct stat st {};
    st.st_mode = S_IFCHR | mode;
    st.st_gid = gid;
    return st;
  };
  constexpr gid_t kKvm = 993;
  CHECK(broker::lifecycle::kvm_open_to_domains(node(0660, kKvm)));   // udev's root:kvm 0660
  CHECK(broker::lifecycle::kvm_open_to_domains(node(0666, 0)));      // open to everyone
  CHECK_FALSE(broker::lifecycle::kvm_open_to_domains(node(0600, 0)));  // root only (no udev)
  CHECK_FALSE(broker::lifecycle::kvm_open_to_domains(node(0660, 0)));  // root's group: never given
  CHECK_FALSE(broker::lifecycle::kvm_open_to_domains(node(0640, kKvm)));  // read only
  struct stat regular = node(0666, kKvm);
  regular.st_mode = S_IFREG | 0666;
  CHECK_FALSE(broker::lifecycle::kvm_open_to_domains(regular));
}
