// The two symbols a TensorRT plugin library must export (IPluginRegistry::loadLibrary looks both up);
// everything else in the library is hidden.
#include "coupled_scan_plugin.h"
#include "coupled_scan_plugin_impl.h"
#include "logging.h"

extern "C" CM_DEPLOY_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    CM_TRACE("setLoggerFinder");
    cm_deploy::plugin::setLoggerFinderImpl(finder);
}

extern "C" CM_DEPLOY_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    CM_TRACE("getCreators");
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&cm_deploy::plugin::coupledScanCreator()};
    nbCreators = 1;
    return creators;
}
